#!/usr/bin/env bash
# The shard-move figures of docs/BENCHMARKS.md: the write pause of each move
# (freeze to the new owner serving) while `cellpay bench http` keeps the
# server busy, and what the moves cost the payments' latency against a run
# without moves, in the same session.
# Usage: scripts/bench-moves.sh [SECONDS] [ACCOUNTS] [MOVES]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
accounts=${2:-100000}
moves=${3:-40}
cargo build --release -q -p cellpay
bin=$PWD/target/release/cellpay
dir=$(mktemp -d)
token=bench-moves-admin-token-0001
port=7171
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
"$bin" serve --listen 127.0.0.1:$port --data-dir "$dir" --cells 3 --token "admin:$token" > "$dir/serve.out" 2>&1 &
until grep -q "cellpay ready" "$dir/serve.out" 2>/dev/null; do sleep 0.2; done
base=http://127.0.0.1:$port
bench() {
  CELLPAY_BENCH_TOKEN=$token "$bin" bench http --target "$base" --accounts "$accounts" --connections 64 \
    --seconds "$seconds" --cross-cell 0.2 --json
}
echo "## without moves"
bench
echo "## with $moves shard moves, one every $((seconds * 1000 / (moves + 2))) ms"
python3 - "$base" "$token" "$seconds" "$moves" <<'PY' &
import json, sys, time, urllib.request
base, token, seconds, moves = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
def call(method, path, body=None):
    req = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())
time.sleep(seconds / (moves + 2) * 2)  # the bench seeds its accounts first
reports = []
for i in range(moves):
    shard = (i * 37) % 1024
    owners = call("GET", "/v1/cluster")["shard_map"]
    try:
        reports.append(call("POST", f"/v1/admin/shards/{shard}/move", {"to": (owners[shard] + 1) % 3}))
    except Exception as e:
        print("move", shard, "failed:", e, file=sys.stderr)
    time.sleep(seconds / (moves + 2))
steps = {k: sorted(r["steps_us"][k] for r in reports) for k in reports[0]["steps_us"]} if reports else {}
print("## median µs per step of the pause:", json.dumps({k: v[len(v) // 2] for k, v in steps.items()}))
print("## records per moved shard (median):", sorted(r["records"] for r in reports)[len(reports) // 2] if reports else 0)
PY
bench
wait %2 2>/dev/null || true
echo "## the moves"
curl -s -H "Authorization: Bearer $token" "$base/v1/admin/moves" | python3 -c 'import json,sys; d=json.load(sys.stdin); d.pop("last"); d["plan"]=None; print(json.dumps(d))'
