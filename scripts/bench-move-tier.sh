#!/usr/bin/env bash
# The write pause of a shard move whose shard holds a day of idempotency
# records in its cell's disk tier, against moves of shards whose records are
# in memory, in the same run and under the same load (docs/BENCHMARKS.md).
#
# 1. `cellpay serve`, 3 cells, 1,024 shards (the defaults' shard count), the
#    disk tier on (the default), a cell's memory holding 1,048,576 records.
# 2. RECORDS transfers paid by payers of shard 11 (a day of that shard's
#    share at 30,000 payments/s is 30,000 × 86,400 / 1,024 ≈ 2.5 million),
#    then FILLER transfers by payers of other shards, so that the shard's
#    records leave memory for the tier as a day's would.
#    The shard's payments come from 1,000 payers of it.
# 3. `cellpay bench http` keeps the server busy while shard 11 moves back and
#    forth TIER_MOVES times and other shards move CONTROL_MOVES times.
# Usage: scripts/bench-move-tier.sh [RECORDS] [FILLER] [SECONDS] [TIER_MOVES] [CONTROL_MOVES]
set -euo pipefail
cd "$(dirname "$0")/.."
records=${1:-2500000}
filler=${2:-1200000}
seconds=${3:-60}
tier_moves=${4:-6}
control_moves=${5:-20}
cargo build --release -q -p cellpay
bin=$PWD/target/release/cellpay
dir=$(mktemp -d)
token=bench-move-tier-admin-token-01
port=7172
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
# RETAINED (optional) sets the records a cell keeps in memory, for a quick try with few records.
"$bin" serve --listen 127.0.0.1:$port --data-dir "$dir" --cells 3 --token "admin:$token" \
  ${RETAINED:+--transfers-retained-max $RETAINED} > "$dir/serve.out" 2>&1 &
until grep -q "cellpay ready" "$dir/serve.out" 2>/dev/null; do sleep 0.2; done
base=http://127.0.0.1:$port
python3 - "$base" "$token" "$records" "$filler" "$seconds" "$tier_moves" "$control_moves" > "$dir/moves.out" <<'PY' &
import json, sys, time, urllib.request
base, token = sys.argv[1], sys.argv[2]
records, filler, seconds, tier_moves, control_moves = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
M = (1 << 64) - 1
def mix64(z):
    z = ((z ^ (z >> 30)) * 0xbf58476d1ce4e5b9) & M
    z = ((z ^ (z >> 27)) * 0x94d049bb133111eb) & M
    return z ^ (z >> 31)
def shard_of(s, shards=1024):
    h = 0xcbf29ce484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001b3) & M
    return mix64(h) % shards
def call(method, path, body=None):
    req = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())
def ids_in(shard, n, prefix):
    out, i = [], 0
    while len(out) < n:
        if shard_of(f"{prefix}-{i}") == shard:
            out.append(f"{prefix}-{i}")
        i += 1
    return out
S = 11  # in cell 2; not shard 5, which holds `bench http`'s bank (100,000 fundings, a hot account)
payers = ids_in(S, 1000, "daypayer")  # a day of the shard's payments comes from many payers
# Payees in shard 11's cell (1,024 shards round robin over 3 cells: shard % 3 == 2), many
# of them, so that no payee's hot-key limit refuses the seeding.
shops = [f"shop-{i}" for i in range(400) if shard_of(f"shop-{i}") % 3 == 2 and shard_of(f"shop-{i}") != S][:64]
# Payers in shard 11's cell (shard % 3 == 2), so their records push its records out of that cell's memory.
fillers = [f"filler-{i}" for i in range(400) if shard_of(f"filler-{i}") % 3 == 2 and shard_of(f"filler-{i}") != S][:64]
for a in payers + shops + fillers:
    call("POST", "/v1/accounts", {"id": a, "currency": "CNY", "overdraft": True})
def pay(prefix, froms, n):
    started, settled = time.time(), 0
    for b in range(0, n, 8190):
        items = [{"id": f"{prefix}-{k}", "from": froms[k % len(froms)], "to": shops[k % len(shops)], "amount": 1}
                 for k in range(b, min(n, b + 8190))]
        settled += sum(r.get("status") == "settled" for r in call("POST", "/v1/transfers/batch", {"transfers": items})["results"])
    return time.time() - started, settled
t_day = pay("day", payers, records)
t_fill = pay("fill", fillers, filler)
time.sleep(3)  # the last spills reach the tier
tier = [l for l in urllib.request.urlopen(urllib.request.Request(base + "/metrics", headers={"Authorization": "Bearer " + token})).read().decode().splitlines()
        if l.startswith("cellpay_idempotency_tier_records{")]
print(json.dumps({"seeded": {"records": records, "settled": t_day[1], "filler": filler, "filler_settled": t_fill[1],
                              "day_s": round(t_day[0], 1), "fill_s": round(t_fill[0], 1), "tier": tier}}), flush=True)
print("SEEDED", flush=True)
time.sleep(30)  # the bench seeds its 100,000 accounts (about 26 s here)
reports = {"tier": [], "control": []}
gap = max(0.2, (seconds - 4) / (tier_moves + control_moves))
k = 0
for i in range(tier_moves + control_moves):
    tier_move = i % max(1, (tier_moves + control_moves) // max(1, tier_moves)) == 0 and len(reports["tier"]) < tier_moves
    shard = S if tier_move else (37 * (k + 1)) % 1024 if (37 * (k + 1)) % 1024 != S else 6
    if not tier_move:
        k += 1
    owners = call("GET", "/v1/cluster")["shard_map"]
    try:
        reports["tier" if tier_move else "control"].append(call("POST", f"/v1/admin/shards/{shard}/move", {"to": (owners[shard] + 1) % 3}))
    except Exception as e:
        print("move", shard, "failed:", e, file=sys.stderr)
    time.sleep(gap)
def summary(rs):
    if not rs:
        return {}
    med = lambda xs: sorted(xs)[len(xs) // 2]
    return {"moves": len(rs), "pause_ms": sorted(round(r["pause_us"] / 1000, 1) for r in rs),
            # The freeze's batch (the export's work is in it) and the pause: what a payment of the shard can wait.
            "freeze_and_pause_ms": sorted(round((r["pause_us"] + r["steps_us"]["freeze"]) / 1000, 1) for r in rs),
            "tier_records_median": med([r["tier_records"] for r in rs]), "tier_copy_s_median": round(med([r["tier_copy_us"] for r in rs]) / 1e6, 2),
            "export_records_median": med([r["records"] for r in rs]),
            "history_entries_median": med([r["history_entries"] for r in rs]),
            "steps_us_median": {s: med([r["steps_us"][s] for r in rs]) for s in rs[0]["steps_us"]}}
print(json.dumps({"tier_shard": summary(reports["tier"]), "control": summary(reports["control"])}), flush=True)
PY
until grep -q SEEDED "$dir/moves.out" 2>/dev/null; do sleep 0.5; done
head -1 "$dir/moves.out"
CELLPAY_BENCH_TOKEN=$token "$bin" bench http --target "$base" --accounts 100000 --connections 64 \
  --seconds "$seconds" --cross-cell 0.2 --json
wait %2 2>/dev/null || true
tail -1 "$dir/moves.out"
