#!/usr/bin/env bash
# Runs the engine benchmarks of docs/BENCHMARKS.md: each configuration RUNS
# times (default 3) in one go on this machine, and prints the median of each
# figure. Usage: scripts/bench-engine.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
cargo build --release -q -p cellpay
bin=target/release/cellpay
out=$(mktemp -d)
configs=(
  "uniform-8190|--accounts 1000000 --batch 8190 --seconds 20 --recovery"
  "uniform-100|--accounts 1000000 --batch 100 --seconds 10"
  "zipf1-8190|--accounts 1000000 --batch 8190 --seconds 10 --zipf 1.0"
  "uniform-8190-10s|--accounts 1000000 --batch 8190 --seconds 10"
)
for r in $(seq "$runs"); do
  for c in "${configs[@]}"; do
    name=${c%%|*}; flags=${c#*|}
    # shellcheck disable=SC2086
    "$bin" bench engine $flags --json >> "$out/$name.jsonl"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys, pathlib
keys = ["transfers_per_s", "commit_p50_ms", "commit_p99_ms", "commit_max_ms", "fsync_p99_ms",
        "cpu_us_per_transfer", "process_cpu_us_per_transfer", "bytes_per_transfer", "log_bytes_per_transfer",
        "checkpoint_max_ms"]
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.jsonl")):
    rows = [json.loads(l) for l in f.read_text().splitlines()]
    print(f"## {f.stem} ({len(rows)} runs, median)")
    for k in keys:
        print(f"  {k:30} {statistics.median(r[k] for r in rows):12.2f}   all: {[round(r[k], 2) for r in rows]}")
    rec = [r["recovery"] for r in rows if r.get("recovery")]
    if rec:
        print(f"  {'recovery_ms':30} {statistics.median(x['recovery_ms'] for x in rec):12.1f}   all: {[round(x['recovery_ms']) for x in rec]}")
        print(f"  {'recovery transfers_total':30} {statistics.median(x['transfers_total'] for x in rec):12.0f}")
        print(f"  {'recovery commands_replayed':30} {[x['commands_replayed'] for x in rec]}")
PY
