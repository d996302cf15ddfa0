#!/usr/bin/env bash
# Runs fuzz targets for $1 seconds each (default 60), two at a time, nice'd; logs to $FUZZ_LOGS (/tmp/fuzz-logs).
# Usage: fuzz/run-smoke.sh [SECONDS] [TARGET...]
set -u
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(path_match jwt access_log_entry catalog var_expansion spool_replay)
export RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-fuzz}
# spool_replay makes a temp metering.dir per input and tollgate fsyncs it: on tmpfs that costs nothing.
[ -d /dev/shm ] && export TMPDIR=${TMPDIR:-/dev/shm}
logs=${FUZZ_LOGS:-/tmp/fuzz-logs}
mkdir -p "$logs"
run() {
  local t=$1 extra=()
  # spool_replay leaves the last open's spool-writer thread and blocking task finishing as the process exits;
  # LeakSanitizer's exit-time check reports those few live objects as leaks (no per-input leak: see README).
  [ "$t" = spool_replay ] && extra=(-detect_leaks=0)
  mkdir -p "corpus/$t"
  nice -n 10 cargo fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 "${extra[@]}" \
    >"$logs/$t.log" 2>&1
  echo "$t exit=$?"
}
# Build once up front, so the parallel runs do not wait on each other for the build lock.
nice -n 10 cargo fuzz build -O >"$logs/build.log" 2>&1 || { echo "build failed: $logs/build.log"; exit 1; }
i=0
for t in "${targets[@]}"; do
  run "$t" &
  i=$((i + 1))
  if [ $((i % 2)) -eq 0 ]; then wait; fi
done
wait
