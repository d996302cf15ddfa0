#!/usr/bin/env python3
"""The markdown report of a bench/state run, from its records (one JSON object a line).

  bench/state_report.py --records records.jsonl --out report.md --meta key=value ...
"""
import argparse
import json
import statistics
import sys


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def mb(kb):
    return None if kb is None else kb / 1024.0


def interval_s(text):
    text = text.strip()
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            try:
                return float(text[: -len(suffix)]) * scale
            except ValueError:
                return None
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--meta", nargs="*", default=[])
    a = ap.parse_args()
    meta = dict(m.split("=", 1) for m in a.meta)
    recs = [json.loads(l) for l in open(a.records) if l.strip()]
    by = lambda phase: [r for r in recs if r.get("phase") == phase]
    keys = {"big": int(meta.get("keys", 0)), "small": int(meta.get("small_keys", 0))}
    label = {db: f"{n:,} keys" for db, n in keys.items()}
    out = []
    w = out.append
    w(f"# State store at scale: {label['big']} (bench/state)\n\n")
    w("| | |\n|---|---|\n")
    for k in ("date", "git", "nproc", "cpu", "kernel", "postgres", "sync_interval", "rounds", "duration_s",
              "sample", "gap_ms", "build", "command"):
        if k in meta:
            w(f"| {k} | `{meta[k]}` |\n" if k == "command" else f"| {k} | {meta[k]} |\n")
    loads = {r["when"]: r["loadavg"] for r in by("load")}
    w(f"| load average (1/5/15 min) | start {loads.get('start', '-')}, end {loads.get('end', '-')} |\n\n")
    goals = []

    fills = by("fill")
    if fills:
        w("## The data\n\n")
        w("| database | keys | apps | developers | subscriptions | bulk keys | keys through SqlStore::write | "
          "store writes/s | fill s | database size |\n|---|---|---|---|---|---|---|---|---|---|\n")
        for f in fills:
            x = f["result"]
            w(f"| {f['db']} | {x['keys']:,} | {x['apps']:,} | {x['developers']:,} | {x['subscriptions']:,} | "
              f"{x['bulk_keys']:,} | {x['store_keys']:,} | {x['store_writes_per_s']:,.0f} | {x['total_s']:.1f} | "
              f"{x['database_bytes'] / 2**20:,.0f} MB |\n")
        w("\n")

    starts = by("start")
    if starts:
        w("## `tollgate serve` start to `/readyz` 200\n\n")
        w("| store | ready s (per start) | median | state read in full, ms (tollgate's log) | RSS at ready MB | "
          "RSS 3 s later MB | peak RSS MB | keys served |\n|---|---|---|---|---|---|---|---|\n")
        for db in ("big", "small"):
            rs = [r for r in starts if r["db"] == db]
            if not rs:
                continue
            w(f"| {label[db]} | {', '.join(fmt(r['ready_s'], 2) for r in rs)} | {fmt(med([r['ready_s'] for r in rs]), 2)} | "
              f"{fmt(med([r['read_took_ms'] for r in rs]), 0)} | {fmt(med([mb(r['rss_ready_kb']) for r in rs]))} | "
              f"{fmt(med([mb(r['rss_kb']) for r in rs]))} | {fmt(med([mb(r['hwm_kb']) for r in rs]))} | "
              f"{fmt(rs[-1].get('catalog_keys'))} |\n")
            if db == "big":
                rss = med([mb(r["rss_kb"]) for r in rs])
                goals.append(("RSS after ready, " + label[db] + " <= 400 MB", f"{rss:.1f} MB (peak "
                              f"{med([mb(r['hwm_kb']) for r in rs]):.1f} MB)", rss <= 400))
                goals.append(("serve start to /readyz 200, " + label[db], f"{med([r['ready_s'] for r in rs]):.2f} s "
                              "median", None))
        dbl = by("db_load")
        if dbl:
            w("\n`SqlStore::load()` alone (the database read and row decoding, no snapshot), in the bench tool:\n\n")
            w("| store | load s | RSS with the image in memory MB |\n|---|---|---|\n")
            for r in dbl:
                x = r["result"]
                w(f"| {label[r['db']]} | {x['load_s']:.2f} | {mb(x['rss_with_image_kb']):.1f} |\n")
        w("\n")

    reloads = by("reload")
    if reloads:
        w("## The catalog file reloaded while the store's keys are served\n\n")
        w("| store | reloads | RSS before MB | peak at start MB | RSS 1 s after the last swap MB | RSS settled MB | "
          "peak during the reloads MB | keys served |\n|---|---|---|---|---|---|---|---|\n")
        for r in reloads:
            w(f"| {label[r['db']]} | {r['reloads']} | {fmt(mb(r['rss_before_kb']))} | {fmt(mb(r.get('start_hwm_kb')))} | "
              f"{fmt(mb(r['rss_kb']))} | {fmt(mb(r['settled_rss_kb']))} | {fmt(mb(r.get('reload_hwm_kb')))} | "
              f"{fmt(r.get('catalog_keys'))} |\n")
            if r["db"] == "big":
                settled = mb(r["settled_rss_kb"])
                peak = mb(r.get("reload_hwm_kb"))
                shown = f"{settled:.1f} MB" + (f" (peak during the reloads {peak:.1f} MB)" if peak else "")
                goals.append((f"RSS settled after {r['reloads']} catalog reloads, {label['big']} <= 400 MB", shown,
                              settled <= 400))
        w("\n")

    memo = by("memory")
    if memo:
        w("## Where the memory goes (heap bytes, counting allocator over jemalloc, in the bench tool)\n\n")
        w("| store | image from SqlStore::load() MiB | snapshot built from it MiB | snapshot build s | "
          "keys alone: imbl::HashMap MiB | std HashMap MiB | size of a Key | lookup ns: served catalog | imbl | "
          "std HashMap |\n|---|---|---|---|---|---|---|---|---|---|\n")
        for r in memo:
            x = r["result"]
            w(f"| {label[r['db']]} | {x['image_mib']:.1f} | {x['snapshot_after_image_dropped_mib']:.1f} | "
              f"{x['snapshot_build_s']:.2f} | {x['keys_imbl_mib']:.1f} | {x['keys_std_hashmap_mib']:.1f} | "
              f"{x['key_size_bytes']} B | {x['lookup_ns_served_catalog']:.0f} | {x['lookup_ns_imbl']:.0f} | "
              f"{x['lookup_ns_std_hashmap']:.0f} |\n")
        w("\nLookups: the store's keys in a scattered order (hash precomputed), one pass; the served catalog is "
          "`Catalog::key` on the snapshot.\n\n")

    direct = by("direct")
    if direct:
        w("## Direct Check load, " + label["big"] + " against " + label["small"] + "\n\n")
        for tool, what in (("check_load", "check_load, 2 connections x 16 in flight, round-robin over "
                            f"{meta.get('sample', '?')} distinct keys spread over the store"),
                           ("h2load", "h2load, 2 connections x 32, one pre-encoded CheckRequest (one key)")):
            rows = [r for r in direct if r["tool"] == tool]
            if not rows:
                continue
            rounds = sorted({r["round"] for r in rows})
            w(f"{what}:\n\n| round | {label['big']} Check/s | {label['small']} Check/s | ratio | "
              f"server CPU µs / Check, big | small |\n|---|---|---|---|---|---|\n")
            ratios, cpu = [], {"big": [], "small": []}
            for rd in rounds:
                rate, per = {}, {}
                for db in ("big", "small"):
                    rr = [r for r in rows if r["round"] == rd and r["db"] == db]
                    if not rr:
                        continue
                    r = rr[0]
                    n = r["result"]["checks"] if tool == "check_load" else r["result"]["done"]
                    rate[db] = r["result"]["rate"]
                    per[db] = r["server_ticks"] / r["tick"] / n * 1e6 if n else None
                    cpu[db].append(per[db])
                ratio = rate["big"] / rate["small"] if rate.get("small") and "big" in rate else None
                ratios.append(ratio)
                w(f"| {rd} | {fmt(rate.get('big'), 0)} | {fmt(rate.get('small'), 0)} | {fmt(ratio, 3)} | "
                  f"{fmt(per.get('big'))} | {fmt(per.get('small'))} |\n")
            m = med(ratios)
            w(f"| median | | | **{fmt(m, 3)}** | {fmt(med(cpu['big']))} | {fmt(med(cpu['small']))} |\n\n")
            if tool == "check_load":
                bad = [(r["db"], r["result"]["denied"], r["result"]["errors"]) for r in rows
                       if r["result"]["denied"] or r["result"]["errors"]]
                if bad:
                    w(f"Denied or failed Checks (should be none): {bad}\n\n")
                lat = {db: [r["result"] for r in rows if r["db"] == db] for db in ("big", "small")}
                w("check_load latency (median over rounds), µs: " + "; ".join(
                    f"{label[db]} p50 {fmt(med([x['p50_us'] for x in v]), 0)}, p99 {fmt(med([x['p99_us'] for x in v]), 0)}, "
                    f"p99.9 {fmt(med([x['p999_us'] for x in v]), 0)}" for db, v in lat.items() if v) + "\n\n")
            else:
                w("tollgate's allowed-decision counter over each h2load run (its 1 s warm-up included) against the Checks "
                  "h2load counted: " + ", ".join(
                    f"{r['db']} r{r['round']} {r['allowed_delta']:,} of {r['result']['done']:,}" for r in rows) + "\n\n")
            if m is not None:
                cpu_ratio = (med(cpu["big"]) or 0) / (med(cpu["small"]) or 1)
                goals.append((f"direct Check/s, {label['big']} / {label['small']} >= 0.90 ({tool})",
                              f"{m:.3f} (rounds {', '.join(fmt(x, 3) for x in ratios)}); CPU per Check "
                              f"{cpu_ratio:.2f}x", m >= 0.90))

    rev = by("revoke")
    if rev:
        r = rev[-1]
        x = r["result"]
        s = x["revoke_to_401_ms"]
        p = x["post_ms"]
        bound = interval_s(r["sync_interval"])
        w("## Revoke on replica A to 401 on replica B\n\n")
        w(f"{x['revokes']} revokes, one every {r['gap_ms']} ms; B probed with gRPC Checks every "
          f"{x['poll_us']} µs (plus the Check's own time) from just before the POST until it answers 401. "
          f"{x['seen_401']} reached 401, {x['timed_out']} timed out, {x['not_allowed_before']} were not "
          f"allowed before, {x['post_failed']} POSTs failed; denial errors {x['errors']}.\n\n")
        w("| ms | n | p50 | p90 | p99 | max | mean |\n|---|---|---|---|---|---|---|\n")
        w(f"| revoke POST sent to 401 on B | {s['n']} | {s['p50']:.2f} | {s['p90']:.2f} | {s['p99']:.2f} | "
          f"{s['max']:.2f} | {s['mean']:.2f} |\n")
        w(f"| the POST on A, sent to answered | {p['n']} | {p['p50']:.2f} | {p['p90']:.2f} | {p['p99']:.2f} | "
          f"{p['max']:.2f} | {p['mean']:.2f} |\n")
        d = x.get("b_401_minus_a_answer_ms")
        if d:
            w(f"| 401 on B minus A's answer (negative: B had it first) | {d['n']} | {d['p50']:.2f} | {d['p90']:.2f} | "
              f"{d['p99']:.2f} | {d['max']:.2f} | {d['mean']:.2f} |\n")
        w("\n")
        if bound is not None:
            goals.append((f"revoke on A to 401 on B, p99 <= sync_interval + 100 ms = {bound * 1000 + 100:.0f} ms",
                          f"p50 {s['p50']:.1f} ms, p99 {s['p99']:.1f} ms, max {s['max']:.1f} ms",
                          s["p99"] <= bound * 1000 + 100 and x["timed_out"] == 0))

    cpu = by("cpu")
    if cpu:
        x = cpu[-1]["result"]
        w("## CPU one revoke costs replica B\n\n")
        w(f"{x['revokes']} revokes on A, one every {x['gap_ms']} ms, B not probed; the same length of time idle "
          f"before ({x['idle_s']:.1f} s idle, {x['busy_s']:.1f} s with revokes). B's CPU from /proc/PID/stat "
          "(utime + stime) and from the sum of /proc/PID/task/*/schedstat; B's own "
          "`tollgate_state_apply_duration_seconds` (the snapshot edit only).\n\n")
        i, b = x["idle"], x["busy"]
        w("| | idle window | revoke window | per revoke (revoke - idle, scaled to the same length) |\n"
          "|---|---|---|---|\n")
        w(f"| CPU, stat ticks | {i['ticks']} | {b['ticks']} | {x['cpu_ms_per_revoke_ticks']:.3f} ms |\n")
        w(f"| CPU, schedstat | {i['ns'] / 1e6:.1f} ms | {b['ns'] / 1e6:.1f} ms | {x['cpu_ms_per_revoke_schedstat']:.3f} ms |\n")
        w(f"| state apply batches (histogram count) | {i['apply_count']:.0f} | {b['apply_count']:.0f} | "
          f"{x['apply_batches_per_revoke']:.3f} |\n")
        w(f"| state apply time (histogram sum) | {i['apply_sum_s'] * 1e3:.3f} ms | {b['apply_sum_s'] * 1e3:.3f} ms | "
          f"{x['apply_us_per_batch']:.1f} µs per batch |\n")
        w(f"| ok sync rounds | {i['syncs_ok']:.0f} | {b['syncs_ok']:.0f} | {x['extra_syncs_per_revoke']:.3f} more |\n")
        w(f"| threads that came or went | {i['threads_changed']} | {b['threads_changed']} | |\n\n")
        goals.append(("CPU one revoke costs B (whole process, minus idle)",
                      f"{x['cpu_ms_per_revoke_schedstat']:.3f} ms (schedstat), {x['cpu_ms_per_revoke_ticks']:.3f} ms "
                      f"(stat ticks); snapshot apply {x['apply_us_per_batch']:.1f} µs of it", None))

    reps = by("replicas")
    if reps:
        r = reps[-1]
        w(f"Replicas after the revokes: A RSS {mb(r['a_rss_kb']):.1f} MB, B RSS {mb(r['b_rss_kb']):.1f} MB "
          f"(peak {mb(r['b_hwm_kb']):.1f} MB), B serves {r['b_keys']:,} keys, B's full reads of the store "
          f"{r['b_syncs_reload']} (1: only the first).\n\n")

    if goals:
        w("## Goals\n\n| goal | measured | verdict |\n|---|---|---|\n")
        for g, m, ok in goals:
            verdict = "-" if ok is None else ("**met**" if ok else "**missed**")
            w(f"| {g} | {m} | {verdict} |\n")
        w("\n")
    open(a.out, "w").write("".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
