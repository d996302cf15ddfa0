#!/usr/bin/env python3
"""A local Stripe Billing emulator for tollgate's tests and quickstart (meter events, meters, summaries, v2 stream).

Every request is validated against Stripe's own OpenAPI excerpts in <project root>/../shared/stripe/
(override with --shared or $TOLLGATE_SHARED_DIR), and so is every response it sends. It binds 127.0.0.1 only.

Stripe behaviour it reproduces:
  * POST /v1/billing/meter_events: form-encoded, Bearer auth; a duplicate `identifier` answers 400 "An event
    already exists with identifier ..." with `stripe-should-retry: false`; 429 (with Stripe-Should-Retry) is
    decided before idempotency; answers (5xx included) are cached under the Idempotency-Key and replayed for the
    same key; timestamps must lie within 35 days back and 5 minutes ahead; values must be whole numbers.
  * POST/GET /v1/billing/meters, GET /v1/billing/meters/{id}/event_summaries (minute-aligned bounds).
  * POST /v2/billing/meter_event_session (tokens expire, 15 minutes by default) and
    POST /v2/billing/meter_event_stream (<= 100 events, 401 billing_meter_event_session_expired).

Control endpoints (no auth; loopback only):
  GET  /_emulator/health          -> {"ok": true}
  GET  /_emulator/state           -> accepted events, totals per customer and event name, duplicates refused,
                                     schema errors, concurrency violations, request counts
  POST /_emulator/faults          JSON: seed, rate_429, rate_500, rate_timeout, timeout_s, commit_on_fault,
                                  latency_ms, retry_after_s, auth_failure, reject_customers, session_ttl_s
  POST /_emulator/expire_sessions -> every v2 session token expires now
  POST /_emulator/plant           JSON {customer, event_name, value, timestamp}: an event nobody sent (tests)
  POST /_emulator/reset           -> forget everything (meters, events, faults)

Usage: stripe_emulator.py [--port 0] [--port-file FILE] [--api-key KEY] [--shared DIR] [--auto-meters|--no-auto-meters]
"""

import argparse
import copy
import datetime as dt
import json
import os
import random
import re
import secrets
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

try:
    import jsonschema
except ImportError:  # pragma: no cover - a setup problem, said clearly
    sys.stderr.write(
        "stripe_emulator: the Python package 'jsonschema' is missing; run: "
        "source scripts/lib.sh && tg_pip_install scripts/requirements-stripe.txt\n"
    )
    sys.exit(3)

DEDUP_MESSAGE = "An event already exists with identifier {}."
MAX_PAST_S = 35 * 24 * 3600
MAX_FUTURE_S = 5 * 60


# ---------------------------------------------------------------------------------------------------------------
# Schemas


class Schemas:
    """Stripe's OpenAPI excerpts, turned into JSON Schema validators with every local $ref inlined."""

    def __init__(self, folder):
        self.folder = folder
        self.components = {}
        self.paths = {}
        self.missing_refs = set()
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".json"):
                continue
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                doc = json.load(f)
            if name.startswith("schemas_"):
                self.components[name[len("schemas_"):-len(".json")]] = doc
            elif name.startswith("paths__"):
                self.paths[name] = doc

    def op(self, path_file, method):
        return self.paths[path_file][method]

    def resolve(self, schema, depth=0):
        """OpenAPI 3.0 schema -> JSON Schema: inline $refs, turn `nullable` into a null branch.

        A $ref the excerpts do not hold (e.g. payment_intent inside api_errors) becomes {} (anything): the
        excerpts cover the billing objects, and the fields that reach outside them are never sent here.
        """
        if depth > 40:
            return {}
        if isinstance(schema, list):
            return [self.resolve(s, depth + 1) for s in schema]
        if not isinstance(schema, dict):
            return schema
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            target = self.components.get(name)
            if target is None:
                self.missing_refs.add(name)
                return {}
            return self.resolve(target, depth + 1)
        out = {}
        for key, value in schema.items():
            if key in ("description", "x-expandableFields", "x-resourceId", "x-stripeBypassValidation", "title"):
                continue
            if key in ("properties",):
                out[key] = {k: self.resolve(v, depth + 1) for k, v in value.items()}
            else:
                out[key] = self.resolve(value, depth + 1)
        if out.pop("nullable", False):
            return {"anyOf": [out, {"type": "null"}]}
        return out

    def validator(self, schema):
        resolved = self.resolve(schema)
        checker = jsonschema.FormatChecker()
        return jsonschema.Draft7Validator(resolved, format_checker=checker)


def first_error(validator, instance):
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    e = errors[0]
    where = ".".join(str(p) for p in e.absolute_path) or "(body)"
    return where, e.message


# ---------------------------------------------------------------------------------------------------------------
# Form decoding (Stripe's deepObject encoding: payload[key]=v, expand[0]=v or expand[]=v)


def decode_form(body):
    out = {}
    for key, value in parse_qsl(body, keep_blank_values=True, strict_parsing=False):
        m = re.fullmatch(r"([^\[\]]+)((?:\[[^\[\]]*\])*)", key)
        if not m:
            raise ValueError(f"malformed parameter name {key!r}")
        name, rest = m.group(1), m.group(2)
        parts = re.findall(r"\[([^\[\]]*)\]", rest)
        if not parts:
            if name in out:
                raise ValueError(f"parameter {name!r} given twice")
            out[name] = value
            continue
        if len(parts) != 1:
            raise ValueError(f"parameter {key!r} nests too deep for these endpoints")
        sub = parts[0]
        if sub == "" or sub.isdigit():
            lst = out.setdefault(name, [])
            if not isinstance(lst, list):
                raise ValueError(f"parameter {name!r} mixes list and object forms")
            lst.append(value)
        else:
            obj = out.setdefault(name, {})
            if not isinstance(obj, dict):
                raise ValueError(f"parameter {name!r} mixes list and object forms")
            obj[sub] = value
    return out


def coerce(instance, schema):
    """Form values are strings; turn the ones the schema types as integer/number/boolean into those types."""
    if not isinstance(instance, dict):
        return instance
    props = schema.get("properties", {})
    out = {}
    for key, value in instance.items():
        ps = props.get(key, {})
        t = ps.get("type")
        if isinstance(value, str) and t == "integer" and re.fullmatch(r"-?\d+", value):
            out[key] = int(value)
        elif isinstance(value, str) and t == "boolean" and value in ("true", "false"):
            out[key] = value == "true"
        elif isinstance(value, dict) and t == "object":
            out[key] = coerce(value, ps)
        else:
            out[key] = value
    return out


def rfc3339(ts):
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).isoformat().replace("+00:00", "Z")


def parse_rfc3339(text):
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# ---------------------------------------------------------------------------------------------------------------
# State


class Faults:
    def __init__(self, spec=None):
        spec = spec or {}
        self.seed = spec.get("seed", 0)
        self.rng = random.Random(self.seed)
        self.rate_429 = float(spec.get("rate_429", 0))
        self.rate_500 = float(spec.get("rate_500", 0))
        self.rate_timeout = float(spec.get("rate_timeout", 0))
        self.timeout_s = float(spec.get("timeout_s", 5))
        self.commit_on_fault = float(spec.get("commit_on_fault", 0.5))
        self.latency_ms = float(spec.get("latency_ms", 0))
        self.retry_after_s = spec.get("retry_after_s")
        self.auth_failure = bool(spec.get("auth_failure", False))
        self.reject_customers = set(spec.get("reject_customers", []))
        self.session_ttl_s = float(spec.get("session_ttl_s", 900))

    def draw(self):
        """None, '429', '500' or 'timeout', and whether a 500/timeout still commits the event."""
        x = self.rng.random()
        commit = self.rng.random() < self.commit_on_fault
        if x < self.rate_429:
            return "429", False
        if x < self.rate_429 + self.rate_500:
            return "500", commit
        if x < self.rate_429 + self.rate_500 + self.rate_timeout:
            return "timeout", commit
        return None, False


class State:
    def __init__(self, auto_meters):
        self.lock = threading.Lock()
        self.auto_meters = auto_meters
        self.reset()

    def reset(self):
        self.meters = {}  # id -> meter object
        self.events = []  # accepted events: dict(identifier, event_name, customer, value, timestamp, via)
        self.identifiers = set()
        self.idempotency = {}  # key -> (params fingerprint, status, headers, body)
        self.duplicates_refused = 0
        self.duplicates_by_identifier = {}
        self.schema_errors = []
        self.response_schema_errors = []
        self.requests = {}
        self.faults_injected = {"429": 0, "500": 0, "timeout": 0, "auth": 0, "reject": 0}
        self.idempotent_replays = 0
        self.in_flight = {}
        self.concurrency_violations = 0
        self.sessions = {}  # token -> expires_at (epoch seconds)
        self.sessions_created = 0
        self.session_expired_rejections = 0
        self.stripe_versions = set()
        self.idempotency_keys_seen = 0
        self.async_errors = []
        self.faults = Faults()

    def meter_for(self, event_name, create):
        for m in self.meters.values():
            if m["event_name"] == event_name:
                return m
        if not create:
            return None
        return self.create_meter(event_name, event_name, "sum")

    def create_meter(self, event_name, display_name, formula):
        now = int(time.time())
        mid = "mtr_test_" + secrets.token_hex(12)
        meter = {
            "id": mid,
            "object": "billing.meter",
            "created": now,
            "updated": now,
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "default_aggregation": {"formula": formula},
            "display_name": display_name,
            "event_name": event_name,
            "event_time_window": None,
            "livemode": False,
            "status": "active",
            "status_transitions": {"deactivated_at": None},
            "value_settings": {"event_payload_key": "value"},
        }
        self.meters[mid] = meter
        return meter

    def snapshot(self):
        totals = {}
        for e in self.events:
            per = totals.setdefault(e["customer"], {})
            per[e["event_name"]] = per.get(e["event_name"], 0) + e["value"]
        return {
            "accepted": len(self.events),
            "events": self.events,
            "totals": totals,
            "duplicates_refused": self.duplicates_refused,
            "duplicates_by_identifier": self.duplicates_by_identifier,
            "schema_errors": self.schema_errors,
            "response_schema_errors": self.response_schema_errors,
            "requests": self.requests,
            "faults_injected": self.faults_injected,
            "idempotent_replays": self.idempotent_replays,
            "concurrency_violations": self.concurrency_violations,
            "in_flight": sum(self.in_flight.values()),
            "sessions_created": self.sessions_created,
            "session_expired_rejections": self.session_expired_rejections,
            "stripe_versions": sorted(self.stripe_versions),
            "async_errors": self.async_errors,
            "meters": list(self.meters.values()),
        }


class Reply(Exception):
    """An HTTP answer raised from deep inside a handler."""

    def __init__(self, status, body, headers=None, schema=None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.schema = schema
        # Stripe saves no idempotent result when a request fails validation (it never began executing).
        self.cacheable = True


def v1_error(status, message, etype="invalid_request_error", code=None, param=None, should_retry=None, headers=None):
    err = {"type": etype, "message": message}
    if code:
        err["code"] = code
    if param:
        err["param"] = param
    h = dict(headers or {})
    if should_retry is not None:
        h["Stripe-Should-Retry"] = "true" if should_retry else "false"
    return Reply(status, {"error": err}, h, schema=("v1_error",))


def v2_error(status, code, message, etype=None, doc_url=None, schema="v2.error"):
    err = {"code": code, "message": message}
    if etype:
        err["type"] = etype
    if doc_url:
        err["doc_url"] = doc_url
    return Reply(status, {"error": err}, {}, schema=(schema,))


# ---------------------------------------------------------------------------------------------------------------
# The server


class Emulator:
    def __init__(self, schemas, api_key, auto_meters):
        self.schemas = schemas
        self.api_key = api_key
        self.state = State(auto_meters)
        s = schemas
        self.v_meter_events_req = s.validator(
            s.op("paths__v1_billing_meter_events.json", "post")["requestBody"]["content"]
            ["application/x-www-form-urlencoded"]["schema"])
        self.meter_events_req_schema = s.resolve(
            s.op("paths__v1_billing_meter_events.json", "post")["requestBody"]["content"]
            ["application/x-www-form-urlencoded"]["schema"])
        self.v_meters_req = s.validator(
            s.op("paths__v1_billing_meters.json", "post")["requestBody"]["content"]
            ["application/x-www-form-urlencoded"]["schema"])
        self.meters_req_schema = s.resolve(
            s.op("paths__v1_billing_meters.json", "post")["requestBody"]["content"]
            ["application/x-www-form-urlencoded"]["schema"])
        self.v_stream_req = s.validator(
            s.op("paths__v2_billing_meter_event_stream.json", "post")["requestBody"]["content"]
            ["application/json"]["schema"])
        self.resp = {
            "v1_error": s.validator(s.components["error"]),
            "billing.meter_event": s.validator(s.components["billing.meter_event"]),
            "billing.meter": s.validator(s.components["billing.meter"]),
            "meter_list": s.validator(
                s.op("paths__v1_billing_meters.json", "get")["responses"]["200"]["content"]["application/json"]["schema"]),
            "summary_list": s.validator(
                s.op("paths__v1_billing_meters__id__event_summaries.json", "get")["responses"]["200"]["content"]
                ["application/json"]["schema"]),
            "v2.billing.meter_event_session": s.validator(s.components["v2.billing.meter_event_session"]),
            "stream_ok": s.validator(
                s.op("paths__v2_billing_meter_event_stream.json", "post")["responses"]["200"]["content"]
                ["application/json"]["schema"]),
            "v2.error": s.validator(s.components["v2.error"]),
            "v2.error.billing_meter_event_session_expired": s.validator(
                s.components["v2.error.billing_meter_event_session_expired"]),
        }
        self.params = {
            "meters_list": s.op("paths__v1_billing_meters.json", "get")["parameters"],
            "summaries": s.op("paths__v1_billing_meters__id__event_summaries.json", "get")["parameters"],
        }

    # -- helpers -------------------------------------------------------------------------------------------------

    def check_api_key(self, headers):
        auth = headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[len("Bearer "):]:
            raise v1_error(401, "You did not provide an API key. Provide it as a Bearer token.")
        if self.state.faults.auth_failure or (self.api_key and auth[len("Bearer "):] != self.api_key):
            with self.state.lock:
                self.state.faults_injected["auth"] += 1
            raise v1_error(401, "Invalid API Key provided.")

    def record_schema_error(self, where, message, path):
        with self.state.lock:
            self.state.schema_errors.append({"path": path, "where": where, "message": message})

    def validate_query(self, params_spec, query, path):
        known = {p["name"]: p for p in params_spec if p["in"] == "query"}
        values = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            base = key.split("[", 1)[0]
            if base not in known:
                self.record_schema_error(key, "unknown query parameter", path)
                raise v1_error(400, f"Received unknown parameter: {key}", param=key)
            values[base] = value
        for name, spec in known.items():
            if spec.get("required") and name not in values:
                self.record_schema_error(name, "required query parameter missing", path)
                raise v1_error(400, f"Missing required param: {name}.", param=name)
            if name not in values:
                continue
            schema = spec.get("schema", {})
            value = values[name]
            if schema.get("type") == "integer":
                if not re.fullmatch(r"-?\d+", value):
                    self.record_schema_error(name, "not an integer", path)
                    raise v1_error(400, f"Invalid integer: {value}", param=name)
                values[name] = int(value)
            elif schema.get("type") == "string":
                err = first_error(jsonschema.Draft7Validator(self.schemas.resolve(schema)), value)
                if err:
                    self.record_schema_error(name, err[1], path)
                    raise v1_error(400, f"Invalid {name}: {err[1]}", param=name)
        return values

    def validate_body(self, validator, instance, path):
        err = first_error(validator, instance)
        if err:
            self.record_schema_error(err[0], err[1], path)
            reply = v1_error(400, f"Invalid request ({err[0]}): {err[1]}", param=err[0])
            reply.cacheable = False
            raise reply

    # -- v1 meter events -----------------------------------------------------------------------------------------

    def meter_event(self, headers, body, path):
        st = self.state
        self.check_api_key(headers)
        with st.lock:
            kind, commit = st.faults.draw()
        if kind == "429":
            with st.lock:
                st.faults_injected["429"] += 1
            extra = {}
            if st.faults.retry_after_s is not None:
                extra["Retry-After"] = str(st.faults.retry_after_s)
            raise v1_error(429, "Too many requests hit the API too quickly.", code="rate_limit",
                           should_retry=True, headers=extra)
        if headers.get("Content-Type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            self.record_schema_error("content-type", "not form-encoded", path)
            raise v1_error(400, "Request bodies must be application/x-www-form-urlencoded.")
        try:
            form = decode_form(body)
        except ValueError as e:
            self.record_schema_error("(body)", str(e), path)
            raise v1_error(400, f"Invalid request: {e}")
        params = coerce(form, self.meter_events_req_schema)
        key = headers.get("Idempotency-Key")
        fingerprint = json.dumps(params, sort_keys=True)
        if key:
            with st.lock:
                st.idempotency_keys_seen += 1
                cached = st.idempotency.get(key)
            if cached is not None:
                if cached[0] != fingerprint:
                    raise v1_error(400, "Keys for idempotent requests can only be used with the same parameters "
                                        "they were first used with.", etype="idempotency_error")
                with st.lock:
                    st.idempotent_replays += 1
                raise Reply(cached[1], copy.deepcopy(cached[3]), dict(cached[2]), schema=cached[4])
        if kind == "timeout" and not commit:
            # Lost before Stripe processed it: the client times out and nothing was recorded.
            reply = v1_error(504, "Gateway timeout", etype="api_error")
        else:
            try:
                reply = self.meter_event_inner(params, path, kind, commit)
            except Reply as r:
                reply = r
        if key and kind != "timeout" and reply.cacheable:
            with st.lock:
                st.idempotency[key] = (fingerprint, reply.status, dict(reply.headers), copy.deepcopy(reply.body),
                                       reply.schema)
        if kind == "timeout":
            with st.lock:
                st.faults_injected["timeout"] += 1
            time.sleep(st.faults.timeout_s)
        raise reply

    def meter_event_inner(self, params, path, kind, commit):
        st = self.state
        self.validate_body(self.v_meter_events_req, params, path)
        payload = params["payload"]
        customer = payload.get("stripe_customer_id")
        if not customer:
            raise v1_error(400, "The payload must contain stripe_customer_id.", param="payload")
        value = payload.get("value")
        if value is None or not re.fullmatch(r"\d+", value):
            raise v1_error(400, f"Invalid value {value!r}: meter event values must be whole numbers.",
                           param="payload[value]")
        now = time.time()
        ts = params.get("timestamp", int(now))
        if ts < now - MAX_PAST_S or ts > now + MAX_FUTURE_S:
            raise v1_error(400, "Timestamp must be within the past 35 calendar days or up to 5 minutes in the future.",
                           param="timestamp")
        identifier = params.get("identifier") or ("gen_" + secrets.token_hex(12))
        pair = (customer, params["event_name"])
        with st.lock:
            meter = st.meter_for(params["event_name"], st.auto_meters)
            if meter is None:
                raise v1_error(400, f"No active meter was found matching event_name {params['event_name']}.",
                               param="event_name")
            if customer in st.faults.reject_customers:
                st.faults_injected["reject"] += 1
                raise v1_error(400, f"No such customer: '{customer}'", code="resource_missing",
                               param="payload[stripe_customer_id]", should_retry=False)
            if st.in_flight.get(pair, 0) > 0:
                st.concurrency_violations += 1
            st.in_flight[pair] = st.in_flight.get(pair, 0) + 1
        try:
            if st.faults.latency_ms:
                time.sleep(st.faults.latency_ms / 1000.0 * (0.5 + st.faults.rng.random()))
            with st.lock:
                if kind == "500":
                    st.faults_injected["500"] += 1
                    if commit and identifier not in st.identifiers:
                        self.accept(identifier, params["event_name"], customer, int(value), ts, "v1")
                    raise v1_error(500, "An unknown error occurred", etype="api_error")
                if identifier in st.identifiers:
                    st.duplicates_refused += 1
                    st.duplicates_by_identifier[identifier] = st.duplicates_by_identifier.get(identifier, 0) + 1
                    raise v1_error(400, DEDUP_MESSAGE.format(identifier), should_retry=False)
                self.accept(identifier, params["event_name"], customer, int(value), ts, "v1")
        finally:
            with st.lock:
                st.in_flight[pair] -= 1
        obj = {
            "object": "billing.meter_event",
            "created": int(now),
            "event_name": params["event_name"],
            "identifier": identifier,
            "livemode": False,
            "payload": payload,
            "timestamp": ts,
        }
        return Reply(200, obj, {}, schema=("billing.meter_event",))

    def accept(self, identifier, event_name, customer, value, ts, via):
        self.state.identifiers.add(identifier)
        self.state.events.append({"identifier": identifier, "event_name": event_name, "customer": customer,
                                  "value": value, "timestamp": ts, "via": via})

    # -- meters and summaries ------------------------------------------------------------------------------------

    def create_meter(self, headers, body, path):
        self.check_api_key(headers)
        params = coerce(decode_form(body), self.meters_req_schema)
        self.validate_body(self.v_meters_req, params, path)
        with self.state.lock:
            if self.state.meter_for(params["event_name"], False):
                raise v1_error(400, f"A meter with event_name {params['event_name']} already exists.")
            m = self.state.create_meter(params["event_name"], params["display_name"],
                                        params["default_aggregation"]["formula"])
        raise Reply(200, m, schema=("billing.meter",))

    def list_meters(self, headers, query, path):
        self.check_api_key(headers)
        q = self.validate_query(self.params["meters_list"], query, path)
        limit = q.get("limit", 10)
        if not 1 <= limit <= 100:
            raise v1_error(400, "limit must be between 1 and 100", param="limit")
        with self.state.lock:
            meters = sorted(self.state.meters.values(), key=lambda m: m["id"])
        if "starting_after" in q:
            meters = [m for m in meters if m["id"] > q["starting_after"]]
        page = meters[:limit]
        raise Reply(200, {"object": "list", "data": page, "has_more": len(meters) > limit,
                          "url": "/v1/billing/meters"}, schema=("meter_list",))

    def summaries(self, headers, meter_id, query, path):
        self.check_api_key(headers)
        q = self.validate_query(self.params["summaries"], query, path)
        with self.state.lock:
            meter = self.state.meters.get(meter_id)
            if meter is None:
                raise v1_error(404, f"No such billing meter: '{meter_id}'", code="resource_missing", param="id")
            start, end = q["start_time"], q["end_time"]
            if start % 60 or end % 60:
                raise v1_error(400, "start_time and end_time must be aligned with minute boundaries.")
            if end <= start:
                raise v1_error(400, "end_time must be after start_time.")
            step = {"hour": 3600, "day": 86400}.get(q.get("value_grouping_window"), end - start)
            if step != end - start and (start % step or end % step):
                raise v1_error(400, "start_time and end_time must align with the value_grouping_window.")
            buckets = []
            t = start
            while t < end:
                buckets.append((t, min(t + step, end)))
                t += step
            data = []
            for (a, b) in buckets:
                total = sum(e["value"] for e in self.state.events
                            if e["event_name"] == meter["event_name"] and e["customer"] == q["customer"]
                            and a <= e["timestamp"] < b)
                data.append({"id": f"mtrusg_{meter_id}_{q['customer']}_{a}", "object": "billing.meter_event_summary",
                             "aggregated_value": total, "start_time": a, "end_time": b, "livemode": False,
                             "meter": meter_id})
        limit = q.get("limit", 10)
        if "starting_after" in q:
            ids = [d["id"] for d in data]
            if q["starting_after"] in ids:
                data = data[ids.index(q["starting_after"]) + 1:]
        page = data[:limit]
        raise Reply(200, {"object": "list", "data": page, "has_more": len(data) > limit,
                          "url": f"/v1/billing/meters/{meter_id}/event_summaries"}, schema=("summary_list",))

    # -- v2 ------------------------------------------------------------------------------------------------------

    def create_session(self, headers, body, path):
        auth = headers.get("Authorization", "")
        if self.state.faults.auth_failure or not auth.startswith("Bearer ") or \
                (self.api_key and auth[len("Bearer "):] != self.api_key):
            raise v2_error(401, "invalid_api_key", "Invalid API Key provided.", etype="invalid_request_error")
        if body.strip() not in (b"", b"{}"):
            self.record_schema_error("(body)", "the session endpoint takes no body", path)
            raise v2_error(400, "invalid_request", "This endpoint takes no parameters.")
        now = time.time()
        token = "mes_test_" + secrets.token_hex(16)
        with self.state.lock:
            expires = now + self.state.faults.session_ttl_s
            self.state.sessions[token] = expires
            self.state.sessions_created += 1
        obj = {"object": "v2.billing.meter_event_session", "id": "mes_" + secrets.token_hex(8),
               "authentication_token": token, "created": rfc3339(now), "expires_at": rfc3339(expires),
               "livemode": False}
        raise Reply(200, obj, schema=("v2.billing.meter_event_session",))

    def stream(self, headers, body, path):
        st = self.state
        auth = headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        with st.lock:
            expires = st.sessions.get(token)
        if expires is None:
            raise v2_error(401, "authentication_required", "Use a meter event session token.",
                           etype="invalid_request_error")
        if time.time() >= expires:
            with st.lock:
                st.session_expired_rejections += 1
            raise v2_error(401, "billing_meter_event_session_expired", "The meter event session has expired.",
                           etype="temporary_session_expired",
                           doc_url="https://docs.stripe.com/api/v2/billing-meter-stream",
                           schema="v2.error.billing_meter_event_session_expired")
        with st.lock:
            kind, commit = st.faults.draw()
        if kind == "429":
            with st.lock:
                st.faults_injected["429"] += 1
            raise v2_error(429, "rate_limit", "Too many requests.", etype="rate_limit_error")
        try:
            doc = json.loads(body or b"null")
        except ValueError:
            self.record_schema_error("(body)", "not JSON", path)
            raise v2_error(400, "invalid_json", "The body is not JSON.")
        err = first_error(self.v_stream_req, doc)
        if err:
            self.record_schema_error(err[0], err[1], path)
            raise v2_error(400, "invalid_request", f"{err[0]}: {err[1]}")
        if len(doc["events"]) > 100:
            self.record_schema_error("events", "more than 100 events", path)
            raise v2_error(400, "invalid_request", "At most 100 events per request.")
        if kind == "500" and not commit:
            with st.lock:
                st.faults_injected["500"] += 1
            raise v2_error(500, "internal_error", "An unknown error occurred", etype="api_error")
        now = time.time()
        with st.lock:
            for ev in doc["events"]:
                payload = ev["payload"]
                ident = ev.get("identifier") or ("gen_" + secrets.token_hex(12))
                ts = parse_rfc3339(ev["timestamp"]) if "timestamp" in ev else now
                value = payload.get("value", "")
                problem = None
                if not payload.get("stripe_customer_id"):
                    problem = "payload_no_customer_defined"
                elif not re.fullmatch(r"\d+", value):
                    problem = "payload_invalid_value"
                elif ts < now - MAX_PAST_S or ts > now + MAX_FUTURE_S:
                    problem = "timestamp_out_of_range"
                elif st.meter_for(ev["event_name"], st.auto_meters) is None:
                    problem = "no_meter"
                if problem:
                    st.async_errors.append({"identifier": ident, "code": problem})
                    continue
                if ident in st.identifiers:
                    st.duplicates_refused += 1
                    st.duplicates_by_identifier[ident] = st.duplicates_by_identifier.get(ident, 0) + 1
                    continue
                self.accept(ident, ev["event_name"], payload["stripe_customer_id"], int(value), int(ts), "v2")
        if kind == "500":
            with st.lock:
                st.faults_injected["500"] += 1
            raise v2_error(500, "internal_error", "An unknown error occurred", etype="api_error")
        if kind == "timeout":
            with st.lock:
                st.faults_injected["timeout"] += 1
            time.sleep(st.faults.timeout_s)
        raise Reply(200, {}, schema=("stream_ok",))

    # -- control -------------------------------------------------------------------------------------------------

    def control(self, method, path, body):
        st = self.state
        if method == "GET" and path == "/_emulator/health":
            raise Reply(200, {"ok": True, "missing_refs": sorted(self.schemas.missing_refs)})
        if method == "GET" and path == "/_emulator/state":
            with st.lock:
                raise Reply(200, copy.deepcopy(st.snapshot()))
        doc = json.loads(body or b"{}")
        if method == "POST" and path == "/_emulator/faults":
            with st.lock:
                st.faults = Faults(doc)
            raise Reply(200, {"ok": True})
        if method == "POST" and path == "/_emulator/expire_sessions":
            with st.lock:
                for token in st.sessions:
                    st.sessions[token] = 0
            raise Reply(200, {"ok": True})
        if method == "POST" and path == "/_emulator/plant":
            with st.lock:
                st.meter_for(doc["event_name"], True)
                self.accept("planted_" + secrets.token_hex(8), doc["event_name"], doc["customer"],
                            int(doc["value"]), int(doc["timestamp"]), "planted")
            raise Reply(200, {"ok": True})
        if method == "POST" and path == "/_emulator/reset":
            with st.lock:
                st.reset()
            raise Reply(200, {"ok": True})
        raise Reply(404, {"error": f"no control endpoint {method} {path}"})

    def route(self, method, target, headers, body):
        parts = urlsplit(target)
        path, query = parts.path, parts.query
        if path.startswith("/v1/") or path.startswith("/v2/"):
            with self.state.lock:
                self.state.requests[f"{method} {path}"] = self.state.requests.get(f"{method} {path}", 0) + 1
                if headers.get("Stripe-Version"):
                    self.state.stripe_versions.add(headers.get("Stripe-Version"))
            if self.state.faults.latency_ms and not path.startswith("/v1/billing/meter_events"):
                time.sleep(self.state.faults.latency_ms / 1000.0)
        if path.startswith("/_emulator/"):
            self.control(method, path, body)
        if method == "POST" and path == "/v1/billing/meter_events":
            self.meter_event(headers, body.decode("utf-8"), path)
        if method == "POST" and path == "/v1/billing/meters":
            self.create_meter(headers, body.decode("utf-8"), path)
        if method == "GET" and path == "/v1/billing/meters":
            self.list_meters(headers, query, path)
        m = re.fullmatch(r"/v1/billing/meters/([^/]+)/event_summaries", path)
        if method == "GET" and m:
            self.summaries(headers, unquote(m.group(1)), query, path)
        if method == "POST" and path == "/v2/billing/meter_event_session":
            self.create_session(headers, body, path)
        if method == "POST" and path == "/v2/billing/meter_event_stream":
            self.stream(headers, body, path)
        if path.startswith("/v2/"):
            raise v2_error(404, "not_found", f"Unrecognized request URL ({method}: {path}).")
        raise v1_error(404, f"Unrecognized request URL ({method}: {path}).")


def make_handler(emulator):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "stripe-emulator"

        def log_message(self, fmt, *args):  # quiet by default; errors are reported explicitly
            if os.environ.get("STRIPE_EMULATOR_VERBOSE"):
                sys.stderr.write("stripe-emulator: " + (fmt % args) + "\n")

        def handle_any(self, method):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                emulator.route(method, self.path, self.headers, body)
                reply = Reply(500, {"error": {"type": "api_error", "message": "no answer"}})
            except Reply as r:
                reply = r
            except Exception as e:  # an emulator bug: say so loudly, answer 500
                traceback.print_exc()
                reply = Reply(500, {"error": {"type": "api_error", "message": f"emulator bug: {e}"}})
            if reply.schema:
                validator = emulator.resp[reply.schema[0]]
                err = first_error(validator, reply.body)
                if err:
                    with emulator.state.lock:
                        emulator.state.response_schema_errors.append(
                            {"path": self.path, "schema": reply.schema[0], "where": err[0], "message": err[1]})
            data = json.dumps(reply.body).encode("utf-8")
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", "req_" + secrets.token_hex(8))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout fault): nothing to tell it

        def do_GET(self):
            self.handle_any("GET")

        def do_POST(self):
            self.handle_any("POST")

        def do_DELETE(self):
            self.handle_any("DELETE")

    return Handler


def main():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    default_shared = os.environ.get("TOLLGATE_SHARED_DIR") or os.path.join(os.path.dirname(root), "shared")
    p = argparse.ArgumentParser(description="A local Stripe Billing emulator (loopback only).")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: the OS picks)")
    p.add_argument("--port-file", help="write the bound port here once listening")
    p.add_argument("--api-key", default="", help="the only API key accepted (empty: any Bearer key)")
    p.add_argument("--shared", default=default_shared, help="the shared/ folder holding stripe/")
    p.add_argument("--no-auto-meters", action="store_true",
                   help="refuse events whose event_name has no meter (default: create the meter on first use)")
    args = p.parse_args()
    folder = os.path.join(args.shared, "stripe")
    if not os.path.isdir(folder):
        sys.stderr.write(f"stripe_emulator: no Stripe schemas at {folder}; pass --shared or set TOLLGATE_SHARED_DIR\n")
        return 2
    emulator = Emulator(Schemas(folder), args.api_key, not args.no_auto_meters)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(emulator))
    server.daemon_threads = True
    port = server.server_address[1]
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
    print(f"stripe emulator listening on http://127.0.0.1:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
