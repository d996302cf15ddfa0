#!/usr/bin/env python3
"""Turns bench/run's records (one JSON object a line) into the markdown report: tables, ratios within the
same run, the issue's targets, and the raw numbers."""
import argparse
import json
import os
import statistics
from datetime import datetime

ORDER = ["envoy", "noop", "noop-rich", "tollgate", "rl-on-deny", "meta-billing", "lean", "peer", "redis", "prepaid",
         "jwt", "envoy-jwt", "baseline"]
LABEL = {
    "envoy": "1 Envoy alone",
    "noop": "2 Envoy + do-nothing ext_authz (floor)",
    "noop-rich": "8 Envoy + do-nothing ext_authz answering like tollgate (floor with tollgate's answer)",
    "tollgate": "3 Envoy + tollgate (API key, memory quota)",
    "redis": "4 Envoy + tollgate (Redis quota)",
    "jwt": "5 Envoy + tollgate (RS256 JWT)",
    "envoy-jwt": "6 Envoy jwt_authn (in-process)",
    "baseline": "7 Envoy + the baseline tollgate build (variant 3's config)",
    "prepaid": "9 Envoy + tollgate (Redis quota, prepaid product: cost 1 credit)",
    "peer": "10 peer stack: do-nothing ext_authz + Envoy's ratelimit filter to Limitador (memory)",
    "rl-on-deny": "11 tollgate, `ratelimit_headers: on_deny`",
    "meta-billing": "12 tollgate, `metadata: billing`",
    "lean": "13 tollgate, both options (on_deny, billing)",
}


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    i = max(0, min(len(values) - 1, int(round(q / 100.0 * len(values) + 0.5)) - 1))
    return values[i]


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=2, unit=""):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}{unit}"
    return f"{v:,}{unit}"


def ms(us):
    return None if us is None else us / 1000.0


def wrk_rps(r):
    return r["wrk"]["requests"] / (r["wrk"]["duration_us"] / 1e6)


def wrk_cells(rs):
    """The req/s, req/s min-max, p50, p99 and p99.9 cells of a row of wrk rounds (medians over rounds)."""
    rates = [wrk_rps(r) for r in rs]
    lat = [fmt(ms(med([r["wrk"][k] for r in rs]))) for k in ("p50_us", "p99_us", "p999_us")]
    return f"{fmt(med(rates), 0)} | {fmt(min(rates), 0)}-{fmt(max(rates), 0)} | " + " | ".join(lat)


def h2load_latencies(path):
    """Per-request latencies (µs) and the count of non-2xx answers from an h2load --log-file."""
    lat, bad = [], 0
    if not os.path.exists(path):
        return lat, bad
    with open(path) as f:
        for line in f:
            cols = line.split()
            if len(cols) < 3:
                continue
            if not cols[1].startswith("2"):
                bad += 1
            lat.append(int(cols[2]))
    return lat, bad


GENAI_TARGETS = ["llm-extproc", "llm-off", "llm-nofilter", "plain", "plain-nofilter"]
GENAI_LABEL = {
    "llm-extproc": "A `/llm/on/`: streamed response, ext_authz + ext_proc + access log",
    "llm-off": "A `/llm/off/`: the same route without ext_proc (filter present, disabled)",
    "llm-nofilter": "B `/llm/off/`: the same route, listener without the ext_proc filter",
    "plain": "A `/plain/`: direct_response, ext_authz + access log (filter present, disabled)",
    "plain-nofilter": "B `/plain/`: the same route, listener without the ext_proc filter",
}


def genai_section(recs, meta, w):
    """The genai phase: ext_proc on a streamed response against the same route without it, and what routes
    without ext_proc pay for the filter being in the chain."""
    gen = [r for r in recs if r["phase"] == "genai"]
    glat = [r for r in recs if r["phase"] == "genai-latency"]
    setup = next((r for r in recs if r["phase"] == "genai-setup"), None)
    total = next((r for r in recs if r["phase"] == "genai-total"), None)
    if not gen and not glat:
        return
    for r in glat:
        values, bad = h2load_latencies(r["log"])
        r["n"], r["non2xx"] = len(values), bad
        r["p50_us"], r["p99_us"], r["p999_us"] = (pct(values, q) for q in (50, 99, 99.9))

    rps = wrk_rps

    def us_per(r, key):
        n = r["wrk"]["requests"]
        return r[key] / r["tick"] / n * 1e6 if n else None

    def counter(d, *subs):
        return sum(v for k, v in d.items() if all(s in k for s in subs))

    def msgs(r):
        n = r["wrk"]["requests"]
        return counter(r["extproc"], ".stream_msgs_sent") / n if n else None

    def by_round(rs):
        out = {}
        for r in rs:
            out.setdefault(r["round"], {})[r["target"]] = r
        return out

    w("## GenAI: ext_proc on a streamed response (phase genai)\n\n")
    if setup:
        w(f"One tollgate (memory quota, gRPC access log {'on' if setup['access_log'] else 'off'}) serving ext_authz, "
          f"the access log and ext_proc; a {setup['upstream']} upstream streaming {setup['body_bytes']:,} bytes of "
          f"server-sent events in {setup['events']} events (OpenAI chat completions, usage in the last event, "
          f"{'back to back' if not setup['gap_ms'] else str(setup['gap_ms']) + ' ms before each event'}), each "
          f"event one HTTP/1.1 chunk written on its own. One Envoy, two listeners: A's chain has the ext_proc filter "
          f"as in envoy/llm.yaml (disabled by default, enabled on `/llm/on/` only, STREAMED response body), B's "
          f"the same chain without it. Same catalog product (metered by `genai:total_tokens`) on both `/llm/` routes. wrk: "
          f"{meta.get('connections')} connections, {meta.get('duration_s')} s per target per round; h2load at "
          f"{setup['rate']} req/s for {meta.get('latency_s')} s.\n\n")
    w("| target | req/s | req/s min-max | p50 ms | p99 ms | p99.9 ms | tollgate CPU us / response | "
      "Envoy CPU us / response | upstream CPU us / response | ext_proc messages / response | non-2xx |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|\n")
    for t in GENAI_TARGETS:
        rs = [r for r in gen if r["target"] == t]
        if not rs:
            continue
        w(f"| {GENAI_LABEL[t]} | {wrk_cells(rs)} | {fmt(med([us_per(r, 'tollgate_ticks') for r in rs]), 1)} "
          f"| {fmt(med([us_per(r, 'envoy_ticks') for r in rs]), 1)} | {fmt(med([us_per(r, 'upstream_ticks') for r in rs]), 1)} "
          f"| {fmt(med([msgs(r) for r in rs]), 2)} "
          f"| {sum(r['wrk']['errors_status'] + r['wrk']['errors_socket'] for r in rs)} |\n")
    w("\n")
    if glat:
        w(f"Latency at a fixed rate (h2load, HTTP/2, {glat[0]['rate']} req/s, medians over rounds):\n\n")
        w("| target | p50 ms | p99 ms | p99.9 ms | requests | non-2xx |\n|---|---|---|---|---|---|\n")
        for t in GENAI_TARGETS:
            rs = [r for r in glat if r["target"] == t]
            if rs:
                w(f"| {GENAI_LABEL[t]} | {fmt(ms(med([r['p50_us'] for r in rs])))} | {fmt(ms(med([r['p99_us'] for r in rs])))} "
                  f"| {fmt(ms(med([r['p999_us'] for r in rs])))} | {sum(r['n'] for r in rs)} | {sum(r['non2xx'] for r in rs)} |\n")
        w("\n")

    w("Within each round, then the median over rounds:\n\n")
    w("| comparison | per round | median |\n|---|---|---|\n")

    def line(name, vals, digits=3):
        vals = [v for v in vals if v is not None]
        if not vals:
            return  # a target of the comparison was not loaded (--genai-targets)
        w(f"| {name} | {', '.join(fmt(x, digits) for x in vals) or 'n/a'} | {fmt(med(vals), digits)} |\n")

    def per_round(rs, a, b, f):
        return [f(x[a], x[b]) for x in by_round(rs).values() if a in x and b in x]

    def safe_ratio(x, y):
        return x / y if x is not None and y else None

    line("(a) req/s: ext_proc on / off, same route", per_round(gen, "llm-extproc", "llm-off", lambda x, y: rps(x) / rps(y)))
    line("(a) p99 ms (wrk, saturated): ext_proc on - off", per_round(gen, "llm-extproc", "llm-off",
         lambda x, y: (x["wrk"]["p99_us"] - y["wrk"]["p99_us"]) / 1000))
    if glat:
        line(f"(a) p50 ms at {glat[0]['rate']} req/s: ext_proc on - off", per_round(glat, "llm-extproc", "llm-off",
             lambda x, y: (x["p50_us"] - y["p50_us"]) / 1000 if x["p50_us"] is not None and y["p50_us"] is not None else None))
        line(f"(a) p99 ms at {glat[0]['rate']} req/s: ext_proc on - off", per_round(glat, "llm-extproc", "llm-off",
             lambda x, y: (x["p99_us"] - y["p99_us"]) / 1000 if x["p99_us"] is not None and y["p99_us"] is not None else None))
    line("(b) tollgate CPU us per streamed response, ext_proc on", [us_per(r, "tollgate_ticks") for r in gen if r["target"] == "llm-extproc"], 1)
    line("(b) tollgate CPU us per response: on - off (what ext_proc adds)", per_round(gen, "llm-extproc", "llm-off",
         lambda x, y: us_per(x, "tollgate_ticks") - us_per(y, "tollgate_ticks")), 1)
    line("(b) tollgate CPU per response: on / off", per_round(gen, "llm-extproc", "llm-off",
         lambda x, y: safe_ratio(us_per(x, "tollgate_ticks"), us_per(y, "tollgate_ticks"))))
    line("(b) Envoy CPU us per response: on - off", per_round(gen, "llm-extproc", "llm-off",
         lambda x, y: us_per(x, "envoy_ticks") - us_per(y, "envoy_ticks")), 1)
    line("(b) ext_proc messages Envoy sent per response", [msgs(r) for r in gen if r["target"] == "llm-extproc"], 2)
    line("(c) req/s: streamed route without ext_proc, filter present / absent",
         per_round(gen, "llm-off", "llm-nofilter", lambda x, y: rps(x) / rps(y)))
    line("(c) req/s: plain route, filter present / absent", per_round(gen, "plain", "plain-nofilter", lambda x, y: rps(x) / rps(y)))
    line("(c) Envoy CPU per request: plain route, filter present / absent", per_round(gen, "plain", "plain-nofilter",
         lambda x, y: safe_ratio(us_per(x, "envoy_ticks"), us_per(y, "envoy_ticks"))))
    line("(c) Envoy CPU per request: streamed route without ext_proc, filter present / absent",
         per_round(gen, "llm-off", "llm-nofilter", lambda x, y: safe_ratio(us_per(x, "envoy_ticks"), us_per(y, "envoy_ticks"))))
    if glat:
        line(f"(c) p99 ms at {glat[0]['rate']} req/s: plain route, filter present - absent", per_round(glat, "plain", "plain-nofilter",
             lambda x, y: (x["p99_us"] - y["p99_us"]) / 1000 if x["p99_us"] is not None and y["p99_us"] is not None else None))
    w("\n")

    ext = [r for r in gen if r["target"] == "llm-extproc"]
    if ext:
        started = sum(counter(r["extproc"], ".streams_started") for r in ext)
        sent = sum(counter(r["extproc"], ".stream_msgs_sent") for r in ext)
        received = sum(counter(r["extproc"], ".stream_msgs_received") for r in ext)
        failed = sum(counter(r["extproc"], ".streams_failed") + counter(r["extproc"], ".failure_mode_allowed")
                     + counter(r["extproc"], ".message_timeouts") for r in ext)
        others = sum(sum(counter(r["extproc"], ".streams_started") for r in gen if r["target"] == t)
                     for t in GENAI_TARGETS if t != "llm-extproc")
        w(f"ext_proc over the ext_proc route's wrk windows: {int(started):,} streams, {int(sent):,} messages sent, "
          f"{int(received):,} answers, {int(failed):,} failed, timed out or let through unread "
          f"(`streams_failed` + `failure_mode_allowed` + `message_timeouts`); {int(others):,} ext_proc streams during "
          f"the other targets' windows.")
        if total:
            t = total["tollgate"]
            complete = counter(t, "genai_responses_total", 'outcome="complete"')
            read = counter(t, "genai_responses_total")
            missing = counter(t, "metering_missing_usage_values_total")
            w(f" Over all rounds tollgate read {int(read):,} response bodies ({int(complete):,} complete, usage found) "
              f"and metering counted {int(missing):,} `genai:total_tokens` values missing (the routes without "
              f"ext_proc: their access-log entries carry no usage).")
        w("\n\n")

    w("Per round (req/s from wrk, latencies in us, CPU in clock ticks of 1/100 s):\n\n")
    w("| round | target | req/s | p50 | p99 | p99.9 | tollgate ticks | Envoy ticks | upstream ticks | ext_proc msgs | non-2xx |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in sorted(gen, key=lambda r: (r["round"], GENAI_TARGETS.index(r["target"]))):
        w(f"| {r['round']} | {r['target']} | {rps(r):.0f} | {r['wrk']['p50_us']} | {r['wrk']['p99_us']} | {r['wrk']['p999_us']} "
          f"| {r['tollgate_ticks']} | {r['envoy_ticks']} | {r['upstream_ticks']} | {int(counter(r['extproc'], '.stream_msgs_sent'))} "
          f"| {r['wrk']['errors_status'] + r['wrk']['errors_socket']} |\n")
    for r in sorted(glat, key=lambda r: (r["round"], GENAI_TARGETS.index(r["target"]))):
        w(f"| {r['round']} | {r['target']} (h2load {r['rate']} req/s) | | {r['p50_us']} | {r['p99_us']} | {r['p999_us']} | | | | | {r['non2xx']} |\n")
    w("\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--meta", nargs="*", default=[])
    a = ap.parse_args()
    meta = dict(m.split("=", 1) for m in a.meta)
    recs = [json.loads(line) for line in open(a.records) if line.strip()]
    out = []
    w = out.append

    w(f"# tollgate benchmark run {meta.get('date', '')} (git {meta.get('git', '?')})\n\n")
    w(f"`{meta.get('command', 'bench/run')}`\n\n")
    w("| machine | |\n|---|---|\n")
    for k in ["nproc", "cpu", "kernel", "envoy", "wrk", "h2load", "build"]:
        w(f"| {k} | {meta.get(k, '?')} |\n")
    loads = {r["when"]: r["loadavg"] for r in recs if r["phase"] == "load"}
    w(f"| load average (1/5/15 min) at start | {loads.get('start', '?')} |\n")
    w(f"| load average at end | {loads.get('end', '?')} |\n\n")
    w(f"Parameters: {meta.get('rounds')} interleaved rounds; wrk {meta.get('duration_s')} s per variant per round "
      f"(1 thread, {meta.get('connections')} connections, HTTP/1.1, closed loop); h2load {meta.get('latency_s')} s "
      f"at {meta.get('rate')} req/s (HTTP/2, open loop); Envoy --concurrency {meta.get('envoy_concurrency')}; "
      f"route answered by {'Envoy direct_response' if meta.get('upstream') == 'direct' else 'an upstream Envoy'}; "
      f"gRPC access log {'on' if meta.get('access_log') == '1' else 'off'}"
      f"{'; QUICK smoke run: not for publication' if meta.get('quick') == '1' else ''}.\n\n")
    notes = [r for r in recs if r["phase"] == "note"]
    for n in notes:
        w(f"- **{n['variant']}**: {n['text']}\n")
    if notes:
        w("\n")

    http = [r for r in recs if r["phase"] == "http"]
    lat = [r for r in recs if r["phase"] == "latency"]
    for r in lat:
        values, bad = h2load_latencies(r["log"])
        r["n"], r["non2xx"] = len(values), bad
        r["p50_us"], r["p99_us"], r["p999_us"] = (pct(values, q) for q in (50, 99, 99.9))
    variants = [v for v in ORDER if any(r["variant"] == v for r in http + lat)]

    def rows(phase_recs, v):
        return [r for r in phase_recs if r["variant"] == v]

    rps = wrk_rps

    def per10k(r, key):
        if key not in r or not r["wrk"]["requests"]:
            return None
        ticks = r[key] + (r.get("limitador_ticks", 0) if key == "authz_ticks" else 0)
        return ticks / r["tick"] / r["wrk"]["requests"] * 10_000

    targets = []
    if http:
        w("## Through Envoy: wrk, HTTP/1.1, closed loop (medians over rounds)\n\n")
        w("| variant | req/s | req/s min-max | p50 ms | p99 ms | p99.9 ms | authorizer CPU s / 10k req | "
          "Envoy CPU s / 10k req | authorizer RSS MB | non-2xx |\n|---|---|---|---|---|---|---|---|---|---|\n")
        for v in variants:
            rs = rows(http, v)
            if not rs:
                continue
            w(f"| {LABEL[v]} | {wrk_cells(rs)} "
              f"| {fmt(med([per10k(r, 'authz_ticks') for r in rs]), 3)} | {fmt(med([per10k(r, 'envoy_ticks') for r in rs]), 3)} "
              f"| {fmt(med([r['authz_rss_kb'] / 1024 if 'authz_rss_kb' in r else None for r in rs]), 1)} "
              f"| {sum(r['wrk']['errors_status'] + r['wrk']['errors_socket'] for r in rs)} |\n")
        w("\n")

    if lat:
        w(f"## Latency at a fixed rate: h2load, HTTP/2, {meta.get('rate')} req/s (medians over rounds)\n\n")
        w("| variant | p50 ms | p99 ms | p99.9 ms | p50 added over floor ms | p99 added over floor ms | requests | non-2xx |\n"
          "|---|---|---|---|---|---|---|---|\n")
        floor = {r["round"]: r for r in rows(lat, "noop")}
        for v in variants:
            rs = rows(lat, v)
            if not rs:
                continue
            add50 = [r["p50_us"] - floor[r["round"]]["p50_us"] for r in rs if r["round"] in floor and r["p50_us"] is not None and floor[r["round"]]["p50_us"] is not None]
            add99 = [r["p99_us"] - floor[r["round"]]["p99_us"] for r in rs if r["round"] in floor and r["p99_us"] is not None and floor[r["round"]]["p99_us"] is not None]
            w(f"| {LABEL[v]} | {fmt(ms(med([r['p50_us'] for r in rs])))} | {fmt(ms(med([r['p99_us'] for r in rs])))} "
              f"| {fmt(ms(med([r['p999_us'] for r in rs])))} | {fmt(ms(med(add50)), 3) if v != 'noop' else '-'} "
              f"| {fmt(ms(med(add99)), 3) if v != 'noop' else '-'} | {sum(r['n'] for r in rs)} | {sum(r['non2xx'] for r in rs)} |\n")
        w("\n")

    # Ratios within a round, then the median: the machine's drift cancels out.
    def ratio(num, den, phase_recs, value):
        by = {}
        for r in phase_recs:
            by.setdefault(r["round"], {})[r["variant"]] = r
        vals = [value(x[num]) / value(x[den]) for x in by.values() if num in x and den in x and value(x[den])]
        return vals

    direct = [r for r in recs if r["phase"] == "direct"]
    if http or lat or direct:
        w("## Ratios in the same run and the issue's targets\n\n")
        w("| comparison | per round | median | target | verdict |\n|---|---|---|---|---|\n")

    def line(name, vals, target=None, ok=None, digits=3):
        verdict = "" if ok is None or not vals else ("**met**" if ok(med(vals)) else "**missed**")
        w(f"| {name} | {', '.join(fmt(x, digits) for x in vals) or 'n/a'} | {fmt(med(vals), digits)} | {target or ''} | {verdict} |\n")
        if target:
            targets.append((name, med(vals), target, verdict))

    if http:
        line("req/s: tollgate (3) / floor (2)", ratio("tollgate", "noop", http, rps), ">= 0.95", lambda x: x >= 0.95)
        if rows(http, "peer"):
            line("req/s: tollgate (3) / peer stack (10)", ratio("tollgate", "peer", http, rps), ">= 1.36",
                 lambda x: x >= 1.36)
            line("req/s: peer stack (10) / floor (2)", ratio("peer", "noop", http, rps))
            line("authorizer CPU per request: tollgate (3) / peer stack (10, both servers)",
                 ratio("tollgate", "peer", http, lambda r: per10k(r, "authz_ticks")))
        for v in ("rl-on-deny", "meta-billing", "lean"):
            if rows(http, v):
                line(f"req/s: {LABEL[v]} / tollgate (3)", ratio(v, "tollgate", http, rps))
                line(f"req/s: {LABEL[v]} / floor (2)", ratio(v, "noop", http, rps))
        line("req/s: floor (2) / Envoy alone (1)", ratio("noop", "envoy", http, rps))
        if rows(http, "noop-rich"):
            line("req/s: floor with tollgate's answer (8) / floor (2)", ratio("noop-rich", "noop", http, rps))
            line("req/s: tollgate (3) / floor with tollgate's answer (8)", ratio("tollgate", "noop-rich", http, rps))
        line("req/s: tollgate (3) / Envoy alone (1)", ratio("tollgate", "envoy", http, rps))
        line("req/s: tollgate JWT (5) / Envoy jwt_authn (6)", ratio("jwt", "envoy-jwt", http, rps))
        line("req/s: tollgate Redis (4) / tollgate memory (3)", ratio("redis", "tollgate", http, rps))
        if rows(http, "prepaid"):
            line("req/s: prepaid (9) / Redis (4)", ratio("prepaid", "redis", http, rps))
            line("authorizer CPU per request: prepaid (9) / Redis (4)",
                 ratio("prepaid", "redis", http, lambda r: per10k(r, "authz_ticks")))
        if rows(http, "baseline"):
            line("req/s: this build (3) / baseline build (7)", ratio("tollgate", "baseline", http, rps))
            line("req/s: baseline build (7) / floor (2)", ratio("baseline", "noop", http, rps))
            line("authorizer CPU per request: this build (3) / baseline build (7)",
                 ratio("tollgate", "baseline", http, lambda r: per10k(r, "authz_ticks")))
    if lat:
        by = {}
        for r in lat:
            by.setdefault(r["round"], {})[r["variant"]] = r
        add = [(x["tollgate"]["p99_us"] - x["noop"]["p99_us"]) / 1000 for x in by.values() if "tollgate" in x and "noop" in x]
        line("p99 added over the floor, ms (fixed rate)", add, "<= 0.2 ms", lambda x: x <= 0.2)
        add50 = [(x["tollgate"]["p50_us"] - x["noop"]["p50_us"]) / 1000 for x in by.values() if "tollgate" in x and "noop" in x]
        line("p50 added over the floor, ms (fixed rate)", add50)
    if http:
        by = {}
        for r in http:
            by.setdefault(r["round"], {})[r["variant"]] = r
        add = [(x["tollgate"]["wrk"]["p99_us"] - x["noop"]["wrk"]["p99_us"]) / 1000 for x in by.values() if "tollgate" in x and "noop" in x]
        line("p99 added over the floor, ms (wrk, saturated: includes queueing)", add)

    def direct_cpu_us(r, n):
        # The CPU window includes the clients' 1 s warm-up at about the same rate: count that share too.
        total = n * (1 + 1 / float(meta.get("duration_s", 10)))
        return r["server_ticks"] / r["tick"] / total * 1e6 if total else None

    if direct:
        h2 = [r for r in direct if r["tool"] == "h2load"]
        cl = [r for r in direct if r["tool"] == "check_load"]
        tg = [r["result"]["rate"] for r in h2 if r["variant"] == "tollgate"]
        line("direct Check/s, tollgate memory store (h2load)", tg, ">= 50,000", lambda x: x >= 50_000, 0)
        line("direct Check/s: tollgate / do-nothing server (h2load)",
             ratio("tollgate", "noop", h2, lambda r: r["result"]["rate"]))
        rr = ratio("redis", "tollgate", h2, lambda r: r["result"]["rate"])
        line("direct Check/s: Redis / memory store (h2load)", rr, ">= 0.70" if rr else None,
             (lambda x: x >= 0.70) if rr else None)
        if rows(h2, "baseline"):
            # Issue 20: 1.3x the build before it (--baseline), A/B in one run.
            line("direct Check/s: this build / baseline build (h2load)",
                 ratio("tollgate", "baseline", h2, lambda r: r["result"]["rate"]), ">= 1.30", lambda x: x >= 1.30)
            line("direct Check/s: this build / baseline build (check_load)",
                 ratio("tollgate", "baseline", cl, lambda r: r["result"]["rate"]))
            line("direct server CPU per Check: this build / baseline build (h2load)",
                 ratio("tollgate", "baseline", h2, lambda r: direct_cpu_us(r, r["result"]["done"])))
            line("direct server CPU per Check: this build / baseline build (check_load)",
                 ratio("tollgate", "baseline", cl, lambda r: direct_cpu_us(r, r["result"]["checks"])))
        if rows(h2, "prepaid"):
            line("direct Check/s: prepaid (9) / Redis (4) (h2load, one hot owner)",
                 ratio("prepaid", "redis", h2, lambda r: r["result"]["rate"]), ">= 0.90", lambda x: x >= 0.90)
            line("direct Check/s: prepaid (9) / Redis (4) (check_load, the request list's owners)",
                 ratio("prepaid", "redis", cl, lambda r: r["result"]["rate"]))
            line("direct server CPU per Check: prepaid (9) / Redis (4) (h2load)",
                 ratio("prepaid", "redis", h2, lambda r: direct_cpu_us(r, r["result"]["done"])))
        w("\n## Direct Check load, no Envoy (medians over rounds)\n\n")
        w("check_load: 2 HTTP/2 connections x 16 requests in flight, tonic client, round-robin over the bench "
          "catalog's apps. h2load: 2 connections x 32 streams, one pre-encoded CheckRequest. Both clients share "
          "the 2 cores with the server; the server's own CPU per Check gives the capacity it would have with "
          "2 cores to itself.\n\n")
        w("| server | tool | Check/s | p50 ms | p99 ms | p99.9 ms | server CPU us / Check | Check/s on 2 dedicated cores (2 / CPU per Check) | checked |\n"
          "|---|---|---|---|---|---|---|---|---|\n")
        for v in ["noop", "tollgate", "redis", "prepaid", "baseline"]:
            for tool, rs in (("check_load", [r for r in cl if r["variant"] == v]), ("h2load", [r for r in h2 if r["variant"] == v])):
                if not rs:
                    continue
                if tool == "check_load":
                    counts = [r["result"]["checks"] for r in rs]
                    check = f"{sum(r['result']['ok'] for r in rs)} ok, {sum(r['result']['denied'] for r in rs)} denied, {sum(r['result']['errors'] for r in rs)} errors"
                else:
                    counts = [r["result"]["done"] for r in rs]
                    allowed = [r.get("allowed_delta") for r in rs if r.get("allowed_delta") is not None]
                    check = f"{sum(allowed)} allowed by tollgate's metric" if allowed else "(no decision metric)"
                cpu = med([direct_cpu_us(r, n) for r, n in zip(rs, counts)])
                res = [r["result"] for r in rs]
                w(f"| {v} | {tool} | {fmt(med([x['rate'] for x in res]), 0)} "
                  f"| {fmt(ms(med([x.get('p50_us') for x in res])))} | {fmt(ms(med([x.get('p99_us') for x in res])))} "
                  f"| {fmt(ms(med([x.get('p999_us') for x in res])))} | {fmt(cpu, 1)} "
                  f"| {fmt(2e6 / cpu if cpu else None, 0)} | {check} |\n")
        w("\n")
    else:
        w("\n")

    peer = next((r for r in recs if r["phase"] == "peer"), None)
    if peer:
        # Proof that the peer stack limited every call: Envoy's ratelimit filter's answers and Limitador's own.
        w("## The peer stack's rate limiting over the run (variant 10)\n\n| counter | value |\n|---|---|\n")
        for name, value in sorted({**peer["envoy"], **peer["limitador"]}.items()):
            w(f"| {name} | {fmt(int(value))} |\n")
        w("\n")

    credits = next((r for r in recs if r["phase"] == "credits"), None)
    if credits:
        m = credits["metrics"]

        def metric(name, **labels):
            want = ",".join(f'{k}="{v}"' for k, v in labels.items())
            for k, v in m.items():
                base, _, rest = k.partition("{")
                if base.endswith(name) and (not want or rest.rstrip("}") == want):
                    return v
            return None

        w("## Prepaid credits over the run (variant 9)\n\n")
        w(f"credits.max_lease {credits['max_lease']}; each owner granted {credits['granted_each']:,} credits before "
          "the load; the ledger is SQLite in metering.dir (WAL, synchronous FULL). From variant 9's /metrics at the end "
          "of the loaded phases:\n\n")
        w("| measure | value |\n|---|---|\n")
        spent = metric("credits_spent_total")
        local = metric("credits_checks_total", result="local")
        ledger = metric("credits_checks_total", result="ledger")
        w(f"| credits spent (allowed prepaid calls) | {fmt(int(spent) if spent is not None else None)} |\n")
        w(f"| prepaid Checks served from the lease / after a ledger call | {fmt(int(local) if local is not None else None)} / "
          f"{fmt(int(ledger) if ledger is not None else None)} |\n")
        for result in ("exhausted", "unavailable"):
            v = metric("credits_checks_total", result=result)
            w(f"| prepaid Checks {result} | {fmt(int(v) if v is not None else None)} |\n")
        calls = 0
        for op in ("lease", "renew", "return"):
            ok, err = metric("credits_ledger_calls_total", op=op, result="ok"), metric("credits_ledger_calls_total", op=op, result="error")
            calls += (ok or 0) + (err or 0)
            w(f"| ledger calls `{op}` ok / error | {fmt(int(ok) if ok is not None else None)} / {fmt(int(err) if err is not None else None)} |\n")
        dsum, dcount = metric("credits_ledger_duration_seconds_sum"), metric("credits_ledger_duration_seconds_count")
        if dcount:
            w(f"| ledger call time, mean | {dsum / dcount * 1000:.2f} ms over {int(dcount):,} calls |\n")
            buckets = sorted(((float(k.split('le="')[1].split('"')[0]) if 'le="+Inf"' not in k else float("inf"), v)
                              for k, v in m.items() if "credits_ledger_duration_seconds_bucket" in k))
            for q in (0.5, 0.99):
                le = next((b for b, c in buckets if c >= q * dcount), None)
                w(f"| ledger call time, p{int(q * 100)} (histogram bucket bound) | <= {fmt(le * 1000 if le not in (None, float('inf')) else None)} ms |\n")
        if spent and calls:
            w(f"| credits spent per ledger call | {spent / calls:,.1f} |\n")
        b = credits.get("balance")
        if isinstance(b, dict):
            w(f"| {credits['owner']}'s account at the end (the owner h2load and wrk spend from) | "
              + ", ".join(f"{k} {fmt(b.get(k))}" for k in ("balance", "granted", "spent", "reserved")) + " |\n")
        w("\n")

    genai_section(recs, meta, w)

    scale = [r for r in recs if r["phase"] == "scale"]
    if scale:
        w("## Scale\n\n")
        start = next((r for r in scale if r["what"] == "start"), None)
        if start:
            w(f"Catalog: {start['keys']:,} keys, {start['products']:,} products x 10 operations, "
              f"{start['catalog_bytes'] / 1e6:.1f} MB of YAML.\n\n")
            w("| measure | value |\n|---|---|\n")
            w(f"| `tollgate check` wall time (parse + validate, process start included) | {start['check_s']:.2f} s |\n")
            w(f"| `tollgate serve` start to /readyz 200 | {start['ready_s']:.2f} s |\n")
            w(f"| RSS after load | {start['rss_kb'] / 1024:.1f} MB (peak {start['hwm_kb'] / 1024:.1f} MB) |\n")
        reloads = []
        for r in (x for x in scale if x["what"] == "reload"):
            log = r.get("log") or {}
            ts = log.get("timestamp")
            if ts:
                t = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
                # The watcher waits 200 ms (DEBOUNCE in src/catalog/watch.rs) for an edit to settle first.
                reloads.append((t - r["swapped_at"]) * 1000 - 200)
        if reloads:
            w(f"| catalog reload: file replaced to new snapshot live, minus the 200 ms debounce (median of {len(reloads)}) "
              f"| {med(reloads):.0f} ms (each: {', '.join(f'{x:.0f}' for x in reloads)}) |\n")
        steady = next((r for r in scale if r["what"] == "steady"), None)
        rel = next((r for r in scale if r["what"] == "reloading"), None)
        if rel:
            w(f"| RSS after {rel['reloads']} more reloads, as the load ends (a reload may be in flight) | "
              f"{rel['rss_kb'] / 1024:.1f} MB (peak {rel['hwm_kb'] / 1024:.1f} MB) |\n")
            if "settled_rss_kb" in rel:
                w(f"| RSS once the last reload is done (generation unchanged for 3 s) | "
                  f"{rel['settled_rss_kb'] / 1024:.1f} MB |\n")
        w("\n")
        if steady or rel:
            w("Check latency at this size (check_load, 2 connections x 4 in flight, round-robin over one key per app):\n\n")
            w("| while | Check/s | p50 ms | p99 ms | p99.9 ms | max ms | errors |\n|---|---|---|---|---|---|---|\n")
            for name, r in (("no reload", steady), (f"catalog rewritten every second ({rel['reloads'] if rel else 0} reloads)", rel)):
                if not r:
                    continue
                x = r["result"]
                w(f"| {name} | {fmt(x['rate'], 0)} | {fmt(ms(x['p50_us']))} | {fmt(ms(x['p99_us']))} | {fmt(ms(x['p999_us']))} "
                  f"| {fmt(ms(x['max_us']))} | {x['errors'] + x['denied']} |\n")
            w("\n")

    w("## Raw numbers\n\nPer round (req/s from wrk; latencies in µs):\n\n")
    w("| phase | round | variant | req/s | p50 | p99 | p99.9 | authorizer ticks | Envoy ticks |\n|---|---|---|---|---|---|---|---|---|\n")
    for r in http:
        w(f"| http | {r['round']} | {r['variant']} | {rps(r):.0f} | {r['wrk']['p50_us']} | {r['wrk']['p99_us']} "
          f"| {r['wrk']['p999_us']} | {r.get('authz_ticks', '')} | {r['envoy_ticks']} |\n")
    for r in lat:
        w(f"| latency | {r['round']} | {r['variant']} | {r['rate']} (fixed) | {r['p50_us']} | {r['p99_us']} | {r['p999_us']} | | |\n")
    for r in direct:
        x = r["result"]
        w(f"| direct/{r['tool']} | {r['round']} | {r['variant']} | {x['rate']:.0f} | {x.get('p50_us', '')} "
          f"| {x.get('p99_us', '')} | {x.get('p999_us', '')} | {r['server_ticks']} | |\n")
    w("\nRecords as bench/run wrote them:\n\n```\n")
    for r in recs:
        r = dict(r)
        r.pop("log", None) if r.get("phase") in ("latency", "genai-latency") else None
        w(json.dumps(r, separators=(",", ":")) + "\n")
    w("```\n")
    with open(a.out, "w") as f:
        f.writelines(out)


if __name__ == "__main__":
    main()
