#!/usr/bin/env python3
"""A local Stripe Billing emulator for tollgate's tests and quickstart (meter events, meters, summaries, v2 stream,
subscriptions, paid invoices and their webhooks).

Every request is validated against Stripe's own OpenAPI excerpts in <project root>/../shared/stripe/
(override with --shared or $TOLLGATE_SHARED_DIR), and so is every response it sends and every event it emits
(the event, and its data.object against the subscription or invoice schema). It binds 127.0.0.1 only and
delivers webhooks to loopback URLs only. Stripe API version: 2026-09-30.endive (a subscription's billing period
lives on its items: items.data[].current_period_start|end; an invoice names its subscription at
parent.subscription_details.subscription).

Stripe behaviour it reproduces:
  * POST /v1/billing/meter_events: form-encoded, Bearer auth; a duplicate `identifier` answers 400 "An event
    already exists with identifier ..." with `stripe-should-retry: false`; 429 (with Stripe-Should-Retry) is
    decided before idempotency; answers (5xx included) are cached under the Idempotency-Key and replayed for the
    same key; timestamps must lie within 35 days back and 5 minutes ahead; values must be whole numbers.
  * POST/GET /v1/billing/meters, GET /v1/billing/meters/{id}/event_summaries (minute-aligned bounds).
  * POST /v2/billing/meter_event_session (tokens expire, 15 minutes by default) and
    POST /v2/billing/meter_event_stream (<= 100 events, 401 billing_meter_event_session_expired).
  * GET /v1/subscriptions: Bearer auth; query customer, price, status (absent: every status but canceled and
    incomplete_expired; `all`: every status; `ended`: canceled and incomplete_expired; else that status),
    collection_method, created / current_period_start / current_period_end (N or [gt|gte|lt|lte]=N),
    limit (1..100, default 10), starting_after / ending_before (a subscription id), expand[]=data.latest_invoice.
    Newest `created` first, ties by id (ids grow with creation, as Stripe's do).
    -> {"object": "list", "data": [...], "has_more": bool, "url": "/v1/subscriptions"}
  * GET /v1/subscriptions/{id} (expand[]=latest_invoice): unknown id -> 404 resource_missing, param "id".
  The faults (429/500/timeout, latency) apply to both, so clients' retry and backoff are exercised.

Webhooks (how Stripe sends them): POST to the configured URL, Content-Type `application/json; charset=utf-8`,
User-Agent `Stripe/1.0 (+https://stripe.com/docs/webhooks)`, the event JSON serialized once at emission, and
`Stripe-Signature: t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>` plus one `,v1=` per extra secret
(a rotation). 10 s timeout, redirects not followed, no lock held while sending (the receiver may call back).
Event: {"id": "evt_...", "object": "event", "api_version", "created", "data": {"object", "previous_attributes"
(updated events only: the changed fields' old values)}, "livemode": false, "pending_webhooks",
"request": {"id": null, "idempotency_key": null}, "type"}.

Control endpoints (no auth; loopback only; JSON in, JSON out):
  GET  /_emulator/health          -> {"ok": true}
  GET  /_emulator/state           -> accepted events, totals per customer and event name, duplicates refused,
                                     schema errors, concurrency violations, request counts, and: prices,
                                     subscriptions and invoices (by id), webhook (the config), webhook_events
                                     (every emitted event, in order), webhook_held (event ids),
                                     webhook_deliveries (every attempt: event, type, status, at, via, error?, tamper?)
  POST /_emulator/faults          JSON: seed, rate_429, rate_500, rate_timeout, timeout_s, commit_on_fault,
                                  latency_ms, retry_after_s, auth_failure, reject_customers, session_ttl_s
  POST /_emulator/expire_sessions -> every v2 session token expires now
  POST /_emulator/plant           JSON {customer, event_name, value, timestamp}: an event nobody sent (tests)
  POST /_emulator/reset           -> forget everything (meters, events, faults, prices, subscriptions, invoices,
                                     webhook config, events and deliveries; delayed deliveries are abandoned)
  POST /_emulator/prices          {"id"?, "lookup_key"?, "product"?, "unit_amount"? (1000), "currency"? ("usd"),
                                   "nickname"?} -> the price (monthly, per unit; ids generated when absent)
  POST /_emulator/webhooks        {"url", "secret", "extra_secrets"?: [], "deliver"?: "now"|"hold"|"drop",
                                   "duplicates"?: 0, "delay_ms"?: 0} -> {"ok": true, "webhook": {...}}
                                  now: sent during the control call; hold: queued for /flush; drop: emitted
                                  (state changes, the event exists) but never sent; duplicates: n extra sends of
                                  each event (A, A, B, B); delay_ms: sent from a background thread after the
                                  delay (the control call answers at once, deliveries say "deliver": "delayed")
  POST /_emulator/subscriptions   {"customer", "price": id or "lookup_key:NAME", "status"?: "active"|"trialing"|
                                   "incomplete", "deliver"?} -> customer.subscription.created (+ invoice.paid
                                   when active); item period = [now, now + 30 d]
  POST /_emulator/subscriptions/{id}/price        {"price", "deliver"?} -> customer.subscription.updated
                                                  (previous_attributes.items)
  POST /_emulator/subscriptions/{id}/fail_payment -> period rolls, status past_due, an open invoice:
                                                  invoice.payment_failed, customer.subscription.updated
  POST /_emulator/subscriptions/{id}/pay          -> the open invoice is paid, status active: invoice.paid,
                                                  customer.subscription.updated (when the status changed)
  POST /_emulator/subscriptions/{id}/cancel       -> canceled, canceled_at = ended_at = now:
                                                  customer.subscription.deleted
  POST /_emulator/subscriptions/{id}/pause        -> paused: customer.subscription.paused
  POST /_emulator/subscriptions/{id}/resume       -> active: customer.subscription.resumed
  POST /_emulator/subscriptions/{id}/status       {"status"} -> any status: customer.subscription.updated
      every subscription call takes "deliver"? (this call only) and answers
      {"subscription": {...}, "events": [ids in emission order],
       "deliveries": [{"event", "status": HTTP status or null, "deliver": "now"|"hold"|"drop"|"delayed",
                       "error"?}]}
  POST /_emulator/invoices        {"customer", "lines": [{"price": id or "lookup_key:NAME", "quantity"?: 1}, ...],
                                   "subscription"?: id, "deliver"?} -> a one-off invoice, paid (status paid,
                                  billing_reason manual; e.g. a credit top-up): one invoice item line per entry
                                  (amount = unit_amount x quantity; the prices share one currency), parent null
                                  or, with "subscription", parent.subscription_details.subscription (the
                                  subscription itself is untouched): invoice.paid. Answers {"invoice": id,
                                  "event": id, "lines": [il ids], "deliveries": [...] (as above)}
  POST /_emulator/webhooks/flush  {"order"?: "created"|"reverse", "duplicates"?: 0} -> {"deliveries": [...]}
                                  (every held event, oldest first or newest first)
  POST /_emulator/webhooks/resend {"event", "tamper"?: "signature"|"stale"|"body"} -> {"status", "error"?}
                                  signature: v1 from a wrong secret; stale: t = now - 600; body: signed over
                                  the original body, one byte of the sent body changed
  Control errors: {"error": "message"} with 400 (bad input, unknown price) or 404 (unknown subscription/event).

Usage: stripe_emulator.py [--port 0] [--port-file FILE] [--api-key KEY] [--shared DIR] [--auto-meters|--no-auto-meters]
"""

import argparse
import copy
import datetime as dt
import hashlib
import hmac
import json
import os
import random
import re
import secrets
import string
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
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
API_VERSION = "2026-09-30.endive"
PERIOD_S = 30 * 24 * 3600
WEBHOOK_TIMEOUT_S = 10
WEBHOOK_USER_AGENT = "Stripe/1.0 (+https://stripe.com/docs/webhooks)"
DELIVER_MODES = ("now", "hold", "drop")
ENDED_STATUSES = ("canceled", "incomplete_expired")
# Ids are "<prefix>_1" + a base-62 sequence number + random, so they sort in creation order like Stripe's.
B62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


# ---------------------------------------------------------------------------------------------------------------
# Schemas


NON_VALIDATING_KEYS = ("description", "x-expandableFields", "x-expansionResources", "x-resourceId",
                       "x-stripeBypassValidation", "title")


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
            if key in NON_VALIDATING_KEYS:
                continue
            if key in ("properties",):
                out[key] = {k: self.resolve(v, depth + 1) for k, v in value.items()}
            else:
                out[key] = self.resolve(value, depth + 1)
        if out.pop("nullable", False):
            return {"anyOf": [out, {"type": "null"}]}
        return out

    def convert(self, schema, needed):
        """Like resolve, but a $ref to a component becomes a $ref into #/definitions (its name added to
        `needed`): Stripe's types are recursive (subscription -> latest_invoice -> invoice -> latest_revision ->
        invoice ...), and inlining them all makes schemas of tens of megabytes."""
        if isinstance(schema, list):
            return [self.convert(s, needed) for s in schema]
        if not isinstance(schema, dict):
            return schema
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            if name not in self.components:
                self.missing_refs.add(name)
                return {}
            needed.add(name)
            return {"$ref": "#/definitions/" + name}
        out = {}
        for key, value in schema.items():
            if key in NON_VALIDATING_KEYS:
                continue
            if key in ("properties",):
                out[key] = {k: self.convert(v, needed) for k, v in value.items()}
            else:
                out[key] = self.convert(value, needed)
        if out.pop("nullable", False):
            return {"anyOf": [out, {"type": "null"}]}
        return out

    def validator(self, schema):
        needed = set()
        root = self.convert(schema, needed)
        definitions = {}
        todo = sorted(needed)
        while todo:
            name = todo.pop()
            if name in definitions:
                continue
            found = set()
            definitions[name] = self.convert(self.components[name], found)
            todo.extend(sorted(found - definitions.keys()))
        checker = jsonschema.FormatChecker()
        return jsonschema.Draft7Validator({"allOf": [root], "definitions": definitions}, format_checker=checker)


def first_error(validator, instance):
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    e = errors[0]
    # An anyOf/oneOf failure (every nullable field is one) says only "not valid under any of the given
    # schemas" about the whole value: name the sub-error that went deepest instead.
    while e.context:
        deepest = max(len(c.absolute_path) for c in e.context)
        e = jsonschema.exceptions.best_match([c for c in e.context if len(c.absolute_path) == deepest])
    where = ".".join(str(p) for p in e.absolute_path) or "(body)"
    message = e.message if len(e.message) <= 300 else e.message[:300] + "..."
    return where, message


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
        self.id_seq = 0  # kept across resets: ids keep growing
        self.generation = 0  # bumped by reset: delayed deliveries of an older generation are abandoned
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
        self.generation += 1
        self.prices = {}  # id -> price
        self.subscriptions = {}  # id -> subscription
        self.invoices = {}  # id -> invoice
        self.webhook = {"url": None, "secret": None, "extra_secrets": [], "deliver": "now", "duplicates": 0,
                        "delay_ms": 0}
        self.webhook_events = []  # every emitted event, in emission order
        self.event_types = {}  # event id -> type
        self.event_bodies = {}  # event id -> the bytes serialized once at emission (what is signed and sent)
        self.webhook_held = []  # event ids held for /_emulator/webhooks/flush, oldest first
        self.webhook_dropped = []  # event ids emitted but never to be sent
        self.webhook_deliveries = []  # every attempt

    def new_id(self, prefix):
        self.id_seq += 1
        n, seq = self.id_seq, ""
        for _ in range(6):
            n, r = divmod(n, 62)
            seq = B62[r] + seq
        return f"{prefix}_1{seq}" + "".join(secrets.choice(B62) for _ in range(16))

    def make_price(self, spec):
        amount = int(spec.get("unit_amount", 1000))
        return {
            "id": spec.get("id") or self.new_id("price"),
            "object": "price",
            "active": True,
            "billing_scheme": "per_unit",
            "created": int(time.time()),
            "currency": spec.get("currency", "usd"),
            "custom_unit_amount": None,
            "livemode": False,
            "lookup_key": spec.get("lookup_key"),
            "metadata": {},
            "nickname": spec.get("nickname"),
            "product": spec.get("product") or self.new_id("prod"),
            "recurring": {"interval": "month", "interval_count": 1, "meter": None, "trial_period_days": None,
                          "usage_type": "licensed"},
            "tax_behavior": "unspecified",
            "tiers_mode": None,
            "transform_quantity": None,
            "type": "recurring",
            "unit_amount": amount,
            "unit_amount_decimal": str(amount),
        }

    def find_price(self, ref):
        """A price by id, or by lookup key when written "lookup_key:NAME"; None when there is none."""
        if isinstance(ref, str) and ref.startswith("lookup_key:"):
            key = ref[len("lookup_key:"):]
            for p in self.prices.values():
                if p["lookup_key"] == key and p["active"]:
                    return p
            return None
        return self.prices.get(ref)

    def make_subscription(self, customer, price, status, now):
        sid = self.new_id("sub")
        item = {
            "id": self.new_id("si"),
            "object": "subscription_item",
            "billing_thresholds": None,
            "created": now,
            "current_period_end": now + PERIOD_S,
            "current_period_start": now,
            "discounts": [],
            "metadata": {},
            "price": copy.deepcopy(price),
            "quantity": 1,
            "subscription": sid,
            "tax_rates": [],
        }
        trialing = status == "trialing"
        return {
            "id": sid,
            "object": "subscription",
            "application": None,
            "application_fee_percent": None,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
            "billing_cycle_anchor": now,
            "billing_cycle_anchor_config": None,
            "billing_mode": {"flexible": {"proration_discounts": "included"}, "type": "flexible", "updated_at": now},
            "billing_schedules": [],
            "billing_thresholds": None,
            "cancel_at": None,
            "cancel_at_period_end": False,
            "canceled_at": None,
            "cancellation_details": {"comment": None, "feedback": None, "reason": None},
            "collection_method": "charge_automatically",
            "created": now,
            "currency": price["currency"],
            "customer": customer,
            "customer_account": None,
            "days_until_due": None,
            "default_payment_method": None,
            "default_source": None,
            "default_tax_rates": [],
            "description": None,
            "discounts": [],
            "ended_at": None,
            "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
            "items": {"object": "list", "data": [item], "has_more": False,
                      "url": f"/v1/subscription_items?subscription={sid}"},
            "latest_invoice": None,
            "livemode": False,
            "metadata": {},
            "next_pending_invoice_item_invoice": None,
            "on_behalf_of": None,
            "pause_collection": None,
            "payment_settings": {"payment_method_options": None, "payment_method_types": None,
                                 "save_default_payment_method": "off"},
            "pending_invoice_item_interval": None,
            "pending_setup_intent": None,
            "pending_update": None,
            "schedule": None,
            "start_date": now,
            "status": status,
            "test_clock": None,
            "transfer_data": None,
            "trial_end": now + PERIOD_S if trialing else None,
            "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
            "trial_start": now if trialing else None,
        }

    def make_invoice(self, sub, reason, paid, period_start, period_end, now):
        """An invoice for the subscription's current item period: paid, or open after one failed attempt."""
        item = sub["items"]["data"][0]
        price = item["price"]
        amount = price["unit_amount"] * item["quantity"]
        iid = self.new_id("in")
        parent = {
            "invoice_item_details": None,
            "subscription_item_details": {"invoice_item": None, "proration": False,
                                          "proration_details": {"credited_items": None},
                                          "subscription": sub["id"], "subscription_item": item["id"]},
            "type": "subscription_item_details",
        }
        description = (f"{item['quantity']} × {price['product']} (at {amount / 100:.2f} {price['currency']} "
                       f"/ month)")
        line = self.make_line(iid, price, item["quantity"], description, parent,
                              item["current_period_start"], item["current_period_end"])
        return self.invoice_of(iid, sub["customer"], price["currency"], [line], reason, paid, sub["id"],
                               period_start, period_end, now)

    def make_paid_invoice(self, customer, entries, sub, now):
        """A one-off invoice, paid at once: one invoice item line per (price, quantity) in entries; its parent
        names sub (a subscription, or None: parent null) as make_invoice's does."""
        iid = self.new_id("in")
        sid = sub["id"] if sub is not None else None
        lines = []
        for price, quantity in entries:
            parent = {
                "invoice_item_details": {"invoice_item": self.new_id("ii"), "proration": False,
                                         "proration_details": {"credited_items": None}, "subscription": sid},
                "subscription_item_details": None,
                "type": "invoice_item_details",
            }
            description = f"{quantity} × {price['nickname'] or price['product']}"
            lines.append(self.make_line(iid, price, quantity, description, parent, now, now))
        return self.invoice_of(iid, customer, entries[0][0]["currency"], lines, "manual", True, sid, now, now, now)

    def make_line(self, iid, price, quantity, description, parent, period_start, period_end):
        """One line_item of invoice iid: quantity × price, under parent (subscription item or invoice item)."""
        return {
            "id": self.new_id("il"),
            "object": "line_item",
            "amount": price["unit_amount"] * quantity,
            "currency": price["currency"],
            "description": description,
            "discount_amounts": [],
            "discountable": True,
            "discounts": [],
            "invoice": iid,
            "livemode": False,
            "metadata": {},
            "parent": parent,
            "period": {"end": period_end, "start": period_start},
            "pretax_credit_amounts": [],
            "pricing": {"price_details": {"price": price["id"], "product": price["product"]},
                        "type": "price_details", "unit_amount_decimal": price["unit_amount_decimal"]},
            "quantity": quantity,
            "taxes": [],
        }

    def invoice_of(self, iid, customer, currency, lines, reason, paid, sid, period_start, period_end, now):
        """The invoice object around lines (amounts summed): paid, or open after one failed attempt; its parent
        names the subscription sid, or is null (a one-off invoice) when sid is None."""
        amount = sum(line["amount"] for line in lines)
        parent = None
        if sid is not None:
            parent = {"quote_details": None, "subscription_details": {"metadata": {}, "subscription": sid},
                      "type": "subscription_details"}
        return {
            "id": iid,
            "object": "invoice",
            "account_country": "US",
            "account_name": "tollgate emulator",
            "account_tax_ids": None,
            "amount_due": amount,
            "amount_overpaid": 0,
            "amount_paid": amount if paid else 0,
            "amount_paid_off_stripe": 0,
            "amount_remaining": 0 if paid else amount,
            "amount_shipping": 0,
            "application": None,
            "attempt_count": 1,
            "attempted": True,
            "auto_advance": not paid,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None, "provider": None,
                              "status": None},
            "automatically_finalizes_at": None,
            "billing_reason": reason,
            "collection_method": "charge_automatically",
            "confirmation_secret": None,
            "created": now,
            "currency": currency,
            "custom_fields": None,
            "customer": customer,
            "customer_account": None,
            "customer_address": None,
            "customer_email": None,
            "customer_name": None,
            "customer_phone": None,
            "customer_shipping": None,
            "customer_tax_exempt": "none",
            "customer_tax_ids": [],
            "default_payment_method": None,
            "default_source": None,
            "default_tax_rates": [],
            "description": None,
            "discounts": [],
            "due_date": None,
            "effective_at": now,
            "ending_balance": 0,
            "footer": None,
            "from_invoice": None,
            "hosted_invoice_url": None,
            "invoice_pdf": None,
            "issuer": {"type": "self"},
            "last_finalization_error": None,
            "latest_revision": None,
            "lines": {"object": "list", "data": lines, "has_more": False, "url": f"/v1/invoices/{iid}/lines"},
            "livemode": False,
            "metadata": {},
            "next_payment_attempt": None if paid else now + 3 * 86400,
            "number": f"EMU-{self.id_seq:06d}",
            "on_behalf_of": None,
            "parent": parent,
            "payment_settings": {"default_mandate": None, "payment_method_options": None,
                                 "payment_method_types": None},
            "period_end": period_end,
            "period_start": period_start,
            "post_payment_credit_notes_amount": 0,
            "pre_payment_credit_notes_amount": 0,
            "receipt_number": None,
            "rendering": None,
            "shipping_cost": None,
            "shipping_details": None,
            "starting_balance": 0,
            "statement_descriptor": None,
            "status": "paid" if paid else "open",
            "status_transitions": {"finalized_at": now, "marked_uncollectible_at": None,
                                   "paid_at": now if paid else None, "voided_at": None},
            "subtotal": amount,
            "subtotal_excluding_tax": amount,
            "test_clock": None,
            "total": amount,
            "total_discount_amounts": [],
            "total_excluding_tax": amount,
            "total_pretax_credit_amounts": [],
            "total_taxes": [],
            "webhooks_delivered_at": None,
        }

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
            "prices": self.prices,
            "subscriptions": self.subscriptions,
            "invoices": self.invoices,
            "webhook": {k: v for k, v in self.webhook.items() if k not in ("secret", "extra_secrets")},
            "webhook_events": self.webhook_events,
            "webhook_held": self.webhook_held,
            "webhook_dropped": self.webhook_dropped,
            "webhook_deliveries": self.webhook_deliveries,
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


def control_error(status, message):
    return Reply(status, {"error": message})


def v2_error(status, code, message, etype=None, doc_url=None, schema="v2.error"):
    err = {"code": code, "message": message}
    if etype:
        err["type"] = etype
    if doc_url:
        err["doc_url"] = doc_url
    return Reply(status, {"error": err}, {}, schema=(schema,))


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def is_loopback_url(url):
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and (host in ("localhost", "::1") or host.startswith("127."))


def tamper_body(body):
    """The same JSON with one byte changed: the last digit of the event's own `created`."""
    marker = b'"created": '
    at = body.index(marker) + len(marker)
    end = at
    while body[end:end + 1].isdigit():
        end += 1
    digit = body[end - 1] - ord("0")
    return body[:end - 1] + bytes([ord("0") + (digit + 1) % 10]) + body[end:]


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
            "subscription_list": s.validator(
                s.op("paths__v1_subscriptions.json", "get")["responses"]["200"]["content"]["application/json"]
                ["schema"]),
            "subscription_get": s.validator(
                s.op("paths__v1_subscriptions__subscription_exposed_id_.json", "get")["responses"]["200"]
                ["content"]["application/json"]["schema"]),
            # Objects checked where they are made (control answers, events' data.object):
            "subscription": s.validator(s.components["subscription"]),
            "subscription_item": s.validator(s.components["subscription_item"]),
            "price": s.validator(s.components["price"]),
            "invoice": s.validator(s.components["invoice"]),
            "event": s.validator(s.components["event"]),
        }
        self.params = {
            "meters_list": s.op("paths__v1_billing_meters.json", "get")["parameters"],
            "summaries": s.op("paths__v1_billing_meters__id__event_summaries.json", "get")["parameters"],
            "subscriptions_list": s.op("paths__v1_subscriptions.json", "get")["parameters"],
            "subscription_get": s.op("paths__v1_subscriptions__subscription_exposed_id_.json", "get")["parameters"],
        }
        # Webhooks go out without proxies and without following redirects (Stripe treats 3xx as a failure).
        self.webhook_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect())

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

    # -- subscriptions (public) ----------------------------------------------------------------------------------

    def public_fault(self):
        """The fault injection for the subscription endpoints: 429 (Stripe-Should-Retry: true, Retry-After when
        set), 500, or a timeout (the answer comes after timeout_s, when the client has given up)."""
        st = self.state
        with st.lock:
            kind, _ = st.faults.draw()
            if kind:
                st.faults_injected[kind] += 1
        if kind == "429":
            extra = {}
            if st.faults.retry_after_s is not None:
                extra["Retry-After"] = str(st.faults.retry_after_s)
            raise v1_error(429, "Too many requests hit the API too quickly.", code="rate_limit",
                           should_retry=True, headers=extra)
        if kind == "500":
            raise v1_error(500, "An unknown error occurred", etype="api_error")
        if kind == "timeout":
            time.sleep(st.faults.timeout_s)

    def range_filters(self, query, path):
        """created / current_period_start / current_period_end given as N or name[gt|gte|lt|lte]=N."""
        names = ("created", "current_period_start", "current_period_end")
        out = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key.split("[", 1)[0] not in names:
                continue
            m = re.fullmatch(r"([a-z_]+)(?:\[(gt|gte|lt|lte)\])?", key)
            if not m:
                self.record_schema_error(key, "unknown range operator", path)
                raise v1_error(400, f"Received unknown parameter: {key}", param=key)
            if not re.fullmatch(r"-?\d+", value):
                self.record_schema_error(key, "not an integer", path)
                raise v1_error(400, f"Invalid integer: {value}", param=key)
            out.setdefault(m.group(1), []).append((m.group(2) or "eq", int(value)))
        return out

    def expansions(self, query, allowed):
        wanted = {v for k, v in parse_qsl(query, keep_blank_values=True) if re.fullmatch(r"expand(\[\d*\])?", k)}
        for w in sorted(wanted):
            if w not in allowed:
                raise v1_error(400, f"This property cannot be expanded ({w}); the emulator expands only "
                                    f"{', '.join(allowed)}.", param="expand")
        return wanted

    def render_subscription(self, sub, expand_invoice):
        out = copy.deepcopy(sub)
        if expand_invoice and out["latest_invoice"] in self.state.invoices:
            out["latest_invoice"] = copy.deepcopy(self.state.invoices[out["latest_invoice"]])
        return out

    def list_subscriptions(self, headers, query, path):
        self.check_api_key(headers)
        self.public_fault()
        q = self.validate_query(self.params["subscriptions_list"], query, path)
        ranges = self.range_filters(query, path)
        expand = self.expansions(query, ("data.latest_invoice",))
        limit = q.get("limit", 10)
        if not 1 <= limit <= 100:
            raise v1_error(400, "limit must be between 1 and 100", param="limit")
        if "starting_after" in q and "ending_before" in q:
            raise v1_error(400, "You may only specify one of these parameters: ending_before, starting_after.")
        status = q.get("status")
        ops = {"eq": lambda a, b: a == b, "gt": lambda a, b: a > b, "gte": lambda a, b: a >= b,
               "lt": lambda a, b: a < b, "lte": lambda a, b: a <= b}

        def keep(sub):
            item = sub["items"]["data"][0]
            if "customer" in q and sub["customer"] != q["customer"]:
                return False
            if "price" in q and all(i["price"]["id"] != q["price"] for i in sub["items"]["data"]):
                return False
            if status is None and sub["status"] in ENDED_STATUSES:
                return False
            if status == "ended" and sub["status"] not in ENDED_STATUSES:
                return False
            if status not in (None, "all", "ended") and sub["status"] != status:
                return False
            if "collection_method" in q and sub["collection_method"] != q["collection_method"]:
                return False
            for name in ("customer_account", "test_clock"):
                if name in q and sub[name] != q[name]:
                    return False
            if "automatic_tax" in q and (q["automatic_tax"] == "true") != sub["automatic_tax"]["enabled"]:
                return False
            for name, conds in ranges.items():
                have = sub["created"] if name == "created" else item[name]
                if not all(ops[op](have, n) for op, n in conds):
                    return False
            return True

        with self.state.lock:
            subs = self.state.subscriptions
            cursor = None
            for param in ("starting_after", "ending_before"):
                if param in q:
                    c = subs.get(q[param])
                    if c is None:
                        raise v1_error(400, f"No such subscription: '{q[param]}'", code="resource_missing",
                                       param=param)
                    cursor = (c["created"], c["id"])
            matched = sorted((x for x in subs.values() if keep(x)), key=lambda x: (x["created"], x["id"]),
                             reverse=True)
            if "starting_after" in q:
                rest = [x for x in matched if (x["created"], x["id"]) < cursor]
                page = rest[:limit]
            elif "ending_before" in q:
                rest = [x for x in matched if (x["created"], x["id"]) > cursor]
                page = rest[-limit:]
            else:
                rest = matched
                page = rest[:limit]
            data = [self.render_subscription(x, "data.latest_invoice" in expand) for x in page]
        raise Reply(200, {"object": "list", "data": data, "has_more": len(rest) > limit, "url": "/v1/subscriptions"},
                    schema=("subscription_list",))

    def get_subscription(self, headers, sid, query, path):
        self.check_api_key(headers)
        self.public_fault()
        self.validate_query(self.params["subscription_get"], query, path)
        expand = self.expansions(query, ("latest_invoice",))
        with self.state.lock:
            sub = self.state.subscriptions.get(sid)
            if sub is None:
                raise v1_error(404, f"No such subscription: '{sid}'", code="resource_missing", param="id")
            out = self.render_subscription(sub, "latest_invoice" in expand)
        raise Reply(200, out, schema=("subscription_get",))

    # -- subscriptions (lifecycle, events, webhooks) -------------------------------------------------------------

    def check_object(self, schema, obj, where):
        """Appends to response_schema_errors when obj does not match Stripe's schema (call with the lock held)."""
        err = first_error(self.resp[schema], obj)
        if err:
            self.state.response_schema_errors.append(
                {"path": where, "schema": schema, "where": err[0], "message": err[1]})

    def emit(self, etype, obj, previous=None):
        """Records an event about obj (a snapshot, lock held) and returns its id. The body is serialized here,
        once: every delivery signs and sends exactly these bytes."""
        st = self.state
        eid = st.new_id("evt")
        data = {"object": copy.deepcopy(obj)}
        if previous is not None:
            data["previous_attributes"] = copy.deepcopy(previous)
        event = {"id": eid, "object": "event", "api_version": API_VERSION, "created": int(time.time()),
                 "data": data, "livemode": False, "pending_webhooks": 1 if st.webhook["url"] else 0,
                 "request": {"id": None, "idempotency_key": None}, "type": etype}
        where = f"event {eid} ({etype})"
        self.check_object("event", event, where)
        self.check_object(obj["object"], obj, where + " data.object")
        st.webhook_events.append(event)
        st.event_types[eid] = etype
        st.event_bodies[eid] = json.dumps(event, indent=2).encode("utf-8")
        return eid

    def open_invoice(self, sub):
        st = self.state
        latest = st.invoices.get(sub["latest_invoice"])
        if latest is not None and latest["status"] == "open":
            return latest
        opened = [i for i in st.invoices.values()
                  if i["status"] == "open" and i["parent"] is not None
                  and i["parent"]["subscription_details"]["subscription"] == sub["id"]]
        return opened[-1] if opened else None

    def sub_price(self, sub, doc, now):
        price = self.state.find_price(doc.get("price"))
        if price is None:
            raise control_error(400, f"No such price: '{doc.get('price')}'")
        if sub["status"] in ENDED_STATUSES:
            raise control_error(400, f"subscription {sub['id']} is {sub['status']}: its price cannot change")
        old_items = copy.deepcopy(sub["items"])
        for item in sub["items"]["data"]:
            item["price"] = copy.deepcopy(price)
        return [self.emit("customer.subscription.updated", sub, {"items": old_items})]

    def sub_fail_payment(self, sub, doc, now):
        st = self.state
        if sub["status"] in ENDED_STATUSES:
            raise control_error(400, f"subscription {sub['id']} is {sub['status']}: it does not renew")
        previous = {"items": copy.deepcopy(sub["items"]), "latest_invoice": sub["latest_invoice"]}
        if sub["status"] != "past_due":
            previous["status"] = sub["status"]
        period_start = sub["items"]["data"][0]["current_period_start"]
        for item in sub["items"]["data"]:
            item["current_period_start"] = now
            item["current_period_end"] = now + PERIOD_S
        invoice = st.make_invoice(sub, "subscription_cycle", False, period_start, now, now)
        st.invoices[invoice["id"]] = invoice
        sub["latest_invoice"] = invoice["id"]
        sub["status"] = "past_due"
        return [self.emit("invoice.payment_failed", invoice),
                self.emit("customer.subscription.updated", sub, previous)]

    def sub_pay(self, sub, doc, now):
        if sub["status"] in ENDED_STATUSES:
            raise control_error(400, f"subscription {sub['id']} is {sub['status']}")
        invoice = self.open_invoice(sub)
        if invoice is None:
            raise control_error(400, f"subscription {sub['id']} has no open invoice (fail_payment makes one)")
        invoice.update({"status": "paid", "amount_paid": invoice["amount_due"], "amount_remaining": 0,
                        "attempt_count": invoice["attempt_count"] + 1, "attempted": True, "auto_advance": False,
                        "next_payment_attempt": None})
        invoice["status_transitions"]["paid_at"] = now
        events = [self.emit("invoice.paid", invoice)]
        if sub["status"] != "active":
            previous = {"status": sub["status"]}
            sub["status"] = "active"
            events.append(self.emit("customer.subscription.updated", sub, previous))
        return events

    def sub_cancel(self, sub, doc, now):
        if sub["status"] == "canceled":
            raise control_error(400, f"subscription {sub['id']} is already canceled")
        sub["status"] = "canceled"
        sub["canceled_at"] = now
        sub["ended_at"] = now
        sub["cancellation_details"] = {"comment": None, "feedback": None, "reason": "cancellation_requested"}
        return [self.emit("customer.subscription.deleted", sub)]

    def sub_pause(self, sub, doc, now):
        if sub["status"] in ENDED_STATUSES or sub["status"] == "paused":
            raise control_error(400, f"subscription {sub['id']} is {sub['status']}: it cannot pause")
        sub["status"] = "paused"
        return [self.emit("customer.subscription.paused", sub)]

    def sub_resume(self, sub, doc, now):
        if sub["status"] != "paused":
            raise control_error(400, f"subscription {sub['id']} is {sub['status']}: only a paused one resumes")
        sub["status"] = "active"
        return [self.emit("customer.subscription.resumed", sub)]

    def sub_status(self, sub, doc, now):
        status = doc.get("status")
        allowed = self.schemas.components["subscription"]["properties"]["status"]["enum"]
        if status not in allowed:
            raise control_error(400, f"status must be one of {', '.join(allowed)}")
        previous = {"status": sub["status"]} if status != sub["status"] else {}
        sub["status"] = status
        if status in ENDED_STATUSES and sub["ended_at"] is None:
            sub["ended_at"] = now
            previous.setdefault("ended_at", None)
        if status == "canceled" and sub["canceled_at"] is None:
            sub["canceled_at"] = now
            previous.setdefault("canceled_at", None)
        return [self.emit("customer.subscription.updated", sub, previous)]

    def subscription_control(self, sid, action, doc, path):
        st = self.state
        mode = doc.get("deliver")
        if mode is not None and mode not in DELIVER_MODES:
            raise control_error(400, f"deliver must be one of {', '.join(DELIVER_MODES)}")
        now = int(time.time())
        with st.lock:
            mode = mode or st.webhook["deliver"]
            if sid is None:
                customer = doc.get("customer")
                if not isinstance(customer, str) or not customer:
                    raise control_error(400, "customer (a string) is required")
                price = st.find_price(doc.get("price"))
                if price is None:
                    raise control_error(400, f"No such price: '{doc.get('price')}'")
                status = doc.get("status", "active")
                if status not in ("active", "trialing", "incomplete"):
                    raise control_error(400, "status must be active, trialing or incomplete")
                sub = st.make_subscription(customer, price, status, now)
                st.subscriptions[sub["id"]] = sub
                invoice = None
                if status != "trialing":
                    invoice = st.make_invoice(sub, "subscription_create", status == "active", now, now, now)
                    st.invoices[invoice["id"]] = invoice
                    sub["latest_invoice"] = invoice["id"]
                events = [self.emit("customer.subscription.created", sub)]
                if status == "active":
                    events.append(self.emit("invoice.paid", invoice))
            else:
                sub = st.subscriptions.get(sid)
                if sub is None:
                    raise control_error(404, f"No such subscription: '{sid}'")
                events = getattr(self, "sub_" + action)(sub, doc, now)
            self.check_object("subscription", sub, path)
            answer = copy.deepcopy(sub)
        deliveries = self.dispatch(events, mode)
        raise Reply(200, {"subscription": answer, "events": events, "deliveries": deliveries})

    def paid_invoice(self, doc, path):
        """POST /_emulator/invoices: a one-off invoice, paid at once (e.g. a credit top-up): invoice.paid."""
        st = self.state
        mode = doc.get("deliver")
        if mode is not None and mode not in DELIVER_MODES:
            raise control_error(400, f"deliver must be one of {', '.join(DELIVER_MODES)}")
        customer, lines, sid = doc.get("customer"), doc.get("lines"), doc.get("subscription")
        if not isinstance(customer, str) or not customer:
            raise control_error(400, "customer (a string) is required")
        if not isinstance(lines, list) or not lines:
            raise control_error(400, "lines (a non-empty list of {price, quantity}) is required")
        for line in lines:
            if not isinstance(line, dict) or not isinstance(line.get("price"), str):
                raise control_error(400, "each line must be an object with a price (a string)")
            quantity = line.get("quantity", 1)
            if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
                raise control_error(400, "quantity must be a whole number >= 1")
        if sid is not None and (not isinstance(sid, str) or not sid):
            raise control_error(400, "subscription must be a subscription id")
        now = int(time.time())
        with st.lock:
            mode = mode or st.webhook["deliver"]
            entries = []
            for line in lines:
                price = st.find_price(line["price"])
                if price is None:
                    raise control_error(400, f"No such price: '{line['price']}'")
                entries.append((price, line.get("quantity", 1)))
            currencies = sorted({price["currency"] for price, _ in entries})
            if len(currencies) > 1:
                raise control_error(400, f"the lines' prices must share one currency, not {', '.join(currencies)}")
            sub = None
            if sid is not None:
                sub = st.subscriptions.get(sid)
                if sub is None:
                    raise control_error(404, f"No such subscription: '{sid}'")
            invoice = st.make_paid_invoice(customer, entries, sub, now)
            st.invoices[invoice["id"]] = invoice
            self.check_object("invoice", invoice, path)
            event = self.emit("invoice.paid", invoice)
            line_ids = [line["id"] for line in invoice["lines"]["data"]]
        deliveries = self.dispatch([event], mode)
        raise Reply(200, {"invoice": invoice["id"], "event": event, "lines": line_ids, "deliveries": deliveries})

    def dispatch(self, event_ids, mode):
        """Sends (now, or after delay_ms from a thread), holds or drops just-emitted events; no lock held."""
        st = self.state
        with st.lock:
            if mode == "hold":
                st.webhook_held.extend(event_ids)
            elif mode == "drop":
                st.webhook_dropped.extend(event_ids)
            delay_ms, times, generation = st.webhook["delay_ms"], 1 + st.webhook["duplicates"], st.generation
        if mode != "now":
            return [{"event": e, "status": None, "deliver": mode} for e in event_ids]
        plan = [e for e in event_ids for _ in range(times)]
        if delay_ms > 0:
            def later():
                time.sleep(delay_ms / 1000.0)
                for e in plan:
                    self.send(e, "delayed", generation=generation)
            threading.Thread(target=later, daemon=True).start()
            return [{"event": e, "status": None, "deliver": "delayed"} for e in plan]
        return [self.send(e, "now") for e in plan]

    def send(self, eid, via, tamper=None, generation=None):
        """One delivery attempt of an event to the configured URL, signed as Stripe signs; recorded."""
        st = self.state
        with st.lock:
            if generation is not None and generation != st.generation:
                return {"event": eid, "status": None, "deliver": via, "error": "abandoned by a reset"}
            cfg = copy.deepcopy(st.webhook)
            body = st.event_bodies[eid]
            etype = st.event_types[eid]
        out = {"event": eid, "status": None, "deliver": via}
        if not cfg["url"]:
            out["error"] = "no webhook url configured (POST /_emulator/webhooks)"
            return out
        t = int(time.time()) - (600 if tamper == "stale" else 0)
        signed = f"{t}.".encode("ascii") + body
        keys = [cfg["secret"]] + cfg["extra_secrets"]
        if tamper == "signature":
            keys = ["whsec_wrong_" + secrets.token_hex(16)]
        signature = ",".join([f"t={t}"] + ["v1=" + hmac.new(k.encode("utf-8"), signed, hashlib.sha256).hexdigest()
                                           for k in keys])
        sent = tamper_body(body) if tamper == "body" else body
        request = urllib.request.Request(cfg["url"], data=sent, method="POST", headers={
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": WEBHOOK_USER_AGENT,
            "Accept": "*/*; q=0.5, application/xml",
            "Cache-Control": "no-cache",
            "Stripe-Signature": signature,
        })
        at = time.time()
        try:
            with self.webhook_opener.open(request, timeout=WEBHOOK_TIMEOUT_S) as resp:
                resp.read(1 << 16)
                out["status"] = resp.status
        except urllib.error.HTTPError as e:  # 3xx (not followed), 4xx, 5xx: an answer all the same
            out["status"] = e.code
            e.close()
        except Exception as e:  # refused, reset, timed out, not HTTP
            out["error"] = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        record = {"event": eid, "type": etype, "status": out["status"], "at": at, "via": via, "url": cfg["url"]}
        if tamper:
            record["tamper"] = tamper
        if "error" in out:
            record["error"] = out["error"]
        with st.lock:
            if generation is None or generation == st.generation:
                st.webhook_deliveries.append(record)
        return out

    def configure_webhooks(self, doc):
        url, secret = doc.get("url"), doc.get("secret")
        if not isinstance(url, str) or not is_loopback_url(url):
            raise control_error(400, "url must be an http(s) URL on a loopback address")
        if not isinstance(secret, str) or not secret:
            raise control_error(400, "secret (a string) is required")
        extra = doc.get("extra_secrets", [])
        if not isinstance(extra, list) or not all(isinstance(x, str) and x for x in extra):
            raise control_error(400, "extra_secrets must be a list of strings")
        deliver = doc.get("deliver", "now")
        if deliver not in DELIVER_MODES:
            raise control_error(400, f"deliver must be one of {', '.join(DELIVER_MODES)}")
        duplicates, delay_ms = doc.get("duplicates", 0), doc.get("delay_ms", 0)
        if not isinstance(duplicates, int) or isinstance(duplicates, bool) or duplicates < 0:
            raise control_error(400, "duplicates must be a whole number >= 0")
        if not isinstance(delay_ms, (int, float)) or isinstance(delay_ms, bool) or delay_ms < 0:
            raise control_error(400, "delay_ms must be a number >= 0")
        webhook = {"url": url, "secret": secret, "extra_secrets": list(extra), "deliver": deliver,
                   "duplicates": duplicates, "delay_ms": delay_ms}
        with self.state.lock:
            self.state.webhook = webhook
        raise Reply(200, {"ok": True, "webhook": {"url": url, "deliver": deliver, "duplicates": duplicates,
                                                  "delay_ms": delay_ms, "secrets": 1 + len(extra)}})

    def flush(self, doc):
        order, duplicates = doc.get("order", "created"), doc.get("duplicates", 0)
        if order not in ("created", "reverse"):
            raise control_error(400, "order must be created or reverse")
        if not isinstance(duplicates, int) or isinstance(duplicates, bool) or duplicates < 0:
            raise control_error(400, "duplicates must be a whole number >= 0")
        with self.state.lock:
            held, self.state.webhook_held = self.state.webhook_held, []
        if order == "reverse":
            held.reverse()
        raise Reply(200, {"deliveries": [self.send(e, "flush") for e in held for _ in range(1 + duplicates)]})

    def resend(self, doc):
        eid, tamper = doc.get("event"), doc.get("tamper")
        if tamper not in (None, "signature", "stale", "body"):
            raise control_error(400, "tamper must be signature, stale or body")
        with self.state.lock:
            known = eid in self.state.event_bodies
        if not known:
            raise control_error(404, f"No such event: '{eid}'")
        out = self.send(eid, "resend", tamper=tamper)
        raise Reply(200, {k: v for k, v in out.items() if k in ("status", "error")})

    def create_price(self, doc, path):
        for name in ("id", "lookup_key", "product", "nickname", "currency"):
            if name in doc and doc[name] is not None and (not isinstance(doc[name], str) or not doc[name]):
                raise control_error(400, f"{name} must be a non-empty string")
        amount = doc.get("unit_amount", 1000)
        if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
            raise control_error(400, "unit_amount must be a whole number of cents >= 0")
        st = self.state
        with st.lock:
            if doc.get("id") in st.prices:
                raise control_error(400, f"price {doc['id']} already exists")
            if doc.get("lookup_key") and any(p["lookup_key"] == doc["lookup_key"] for p in st.prices.values()):
                raise control_error(400, f"a price already has lookup_key {doc['lookup_key']}")
            price = st.make_price(doc)
            st.prices[price["id"]] = price
            self.check_object("price", price, path)
            answer = copy.deepcopy(price)
        raise Reply(200, answer)

    # -- control -------------------------------------------------------------------------------------------------

    def control(self, method, path, body):
        st = self.state
        if method == "GET" and path == "/_emulator/health":
            raise Reply(200, {"ok": True, "missing_refs": sorted(self.schemas.missing_refs)})
        if method == "GET" and path == "/_emulator/state":
            with st.lock:
                raise Reply(200, copy.deepcopy(st.snapshot()))
        try:
            doc = json.loads(body or b"{}")
        except ValueError:
            raise control_error(400, "the body is not JSON")
        if not isinstance(doc, dict):
            raise control_error(400, "the body must be a JSON object")
        if method == "POST" and path == "/_emulator/prices":
            self.create_price(doc, path)
        if method == "POST" and path == "/_emulator/webhooks":
            self.configure_webhooks(doc)
        if method == "POST" and path == "/_emulator/webhooks/flush":
            self.flush(doc)
        if method == "POST" and path == "/_emulator/webhooks/resend":
            self.resend(doc)
        if method == "POST" and path == "/_emulator/subscriptions":
            self.subscription_control(None, None, doc, path)
        m = re.fullmatch(r"/_emulator/subscriptions/([^/]+)/(price|fail_payment|pay|cancel|pause|resume|status)", path)
        if method == "POST" and m:
            self.subscription_control(unquote(m.group(1)), m.group(2), doc, path)
        if method == "POST" and path == "/_emulator/invoices":
            self.paid_invoice(doc, path)
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
        if method == "GET" and path == "/v1/subscriptions":
            self.list_subscriptions(headers, query, path)
        m = re.fullmatch(r"/v1/subscriptions/([^/]+)", path)
        if method == "GET" and m:
            self.get_subscription(headers, unquote(m.group(1)), query, path)
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
