#!/usr/bin/env bash
# One cell engine on PostgreSQL against the same engine on the embedded store,
# and against the naive transfer transaction on the same PostgreSQL
# (scripts/bench-pg.sh: two UPDATEs and an INSERT per transaction, 64 pgbench
# clients), alternating ROUNDS times in one session; prints the medians.
#
#   scripts/bench-engine-pg.sh [ROUNDS] [SECONDS]      (BIN=path overrides the binary)
#
# `cellpay bench engine`: 1,000,000 accounts, batch 8,190, 4 batches in flight,
# then --recovery (log written up to just before the next checkpoint, the cell
# halted without a final checkpoint, and its recovery timed). The PostgreSQL
# engine writes to schema bench_engine of database `test` (dropped after).
# Needs a release build (cargo build --release) and the machine's PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECONDS_=${2:-10}
BIN=${BIN:-$PWD/target/release/cellpay}
PG=${PG:-postgres://root@127.0.0.1:5432/test}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
psql -h 127.0.0.1 -U root -d test -At -c "SELECT name || ' = ' || setting FROM pg_settings WHERE name IN ('synchronous_commit', 'fsync', 'wal_sync_method', 'shared_buffers')"
for r in $(seq "$ROUNDS"); do
  "$BIN" bench engine --accounts 1000000 --batch 8190 --seconds "$SECONDS_" --recovery --json >>"$out/embedded.jsonl"
  "$BIN" bench engine --accounts 1000000 --batch 8190 --seconds "$SECONDS_" --recovery --store "$PG" --json >>"$out/postgres.jsonl"
  scripts/bench-pg.sh "$SECONDS_" 1000000 | grep -E "^tps" | sed -E 's/^tps = ([0-9.]+).*/\1/' >>"$out/naive.txt"
  echo "round $r done" >&2
done
python3 - "$out" <<'PY'
import json, statistics, sys, pathlib
d = pathlib.Path(sys.argv[1])
naive = [float(l) for l in (d / "naive.txt").read_text().split()]
print(f"naive SQL transfer (pgbench, 64 clients) transfers/s: median {statistics.median(naive):,.0f}  all {naive}")
for name in ["embedded", "postgres"]:
    rows = [json.loads(l) for l in (d / f"{name}.jsonl").read_text().splitlines()]
    med = lambda k: statistics.median(r[k] for r in rows)
    print(f"## engine on {name} ({len(rows)} runs, median)")
    for k in ["transfers_per_s", "commit_p50_ms", "commit_p99_ms", "fsync_p50_ms", "fsync_p99_ms",
              "batch_size_mean", "cpu_us_per_transfer", "log_bytes_per_transfer", "checkpoint_max_ms"]:
        print(f"  {k:26} {med(k):12.2f}   all: {[round(r[k], 2) for r in rows]}")
    rec = [r["recovery"] for r in rows]
    print(f"  {'recovery_ms':26} {statistics.median(x['recovery_ms'] for x in rec):12.0f}   all: {[round(x['recovery_ms']) for x in rec]}"
          f"   (accounts {rec[0]['accounts']}, commands replayed {[x['commands_replayed'] for x in rec]})")
    print(f"  ratio to naive SQL: {med('transfers_per_s') / statistics.median(naive):.1f}x")
PY
