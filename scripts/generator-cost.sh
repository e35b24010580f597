#!/usr/bin/env bash
# The generator's own cost against wrk (docs/BENCHMARKS.md, "The generator's own
# cost, against wrk"): requests per CPU-second of each load generator, the server
# pinned to CPU 0 and every generator to CPU 1, runs interleaved.
#  degraded: shadow transfers with the shadow_off switch on (all 503): wrk vs `bench http --shadow`
#  served:   payments, a fresh id each: wrk vs `bench http` (closed loop, 256 connections)
#  open:     payments at about 6,000/s: wrk -c4 vs `cellpay stress` (open loop, 6,000/s)
# wrk's script picks any payee, so 3 of 4 live in another cell: the payments of
# `bench http` and `stress` here are 75 % cross-cell too.
# Each line is one run; the medians close the output. Needs wrk, taskset, /usr/bin/time
# and 2 CPUs. Usage: scripts/generator-cost.sh [ROUNDS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
seconds=${2:-10}
cargo build --release -q -p cellpay
bin=$PWD/target/release/cellpay
work=$(mktemp -d)
export SECRET=generator-cost-$RANDOM-0123456789abcdef
server=
trap 'if [ -n "$server" ]; then kill "$server"; fi; rm -rf "$work"' EXIT

start_server() { # PORT
  RUST_LOG=error taskset -c 0 "$bin" serve --listen "127.0.0.1:$1" --data-dir "$work/data-$1" --token "admin:$SECRET" >/dev/null 2>&1 &
  server=$!
  sleep 2
  # Opens and funds u0000000..u0000999, the accounts the wrk scripts pay between.
  "$bin" bench http --target "http://127.0.0.1:$1" --token "$SECRET" --accounts 1000 --seconds 1 --connections 8 --json >/dev/null 2>&1
}
stop_server() { kill "$server"; wait "$server" || true; server=; }
wrk_run() { # LABEL PORT CONNECTIONS SCRIPT
  local out req cpu
  out=$(/usr/bin/time -f "CPU %U %S" taskset -c 1 wrk -t1 -c"$3" -d"${seconds}s" -s "scripts/wrk/$4" "http://127.0.0.1:$2" 2>&1)
  req=$(awk '/requests in/ {print $1}' <<<"$out")
  cpu=$(awk '/^CPU/ {print $2 + $3}' <<<"$out")
  echo "$1 wrk requests=$req per_s=$(awk '/Requests\/sec/ {print $2}' <<<"$out") cpu_s=$cpu per_cpu_s=$(awk -v r="$req" -v c="$cpu" 'BEGIN {printf "%.0f", r / c}')"
}
bench_run() { # LABEL PORT [FLAGS]
  local label=$1 port=$2
  shift 2
  "$bin" bench http --target "http://127.0.0.1:$port" --token "$SECRET" --accounts 1000 --seconds "$seconds" \
    --connections 256 --cpus 1 --json "$@" 2>/dev/null >"$work/bench.json" || true
  python3 - "$label" "$work/bench.json" <<'PY' || echo "$label bench failed"
import json, sys
r = json.load(open(sys.argv[2])); g = r["placement"]["generator"]
print(sys.argv[1], "bench requests=%d per_s=%.0f cpu_s=%.2f per_cpu_s=%.0f server_us_per_request=%.1f server_us_per_payment=%s engine_us_per_payment=%s"
      % (r["requests"], r["requests_per_s"], g["cpu_s"], r["generator_requests_per_cpu_s"], r["server_cpu_us_per_request"],
         r["server_cpu_us_per_payment"], r["engine_cpu_us_per_payment"]))
PY
}
stress_run() { # LABEL PORT
  cat >"$work/open.toml" <<PROFILE
name = "generator-cost"
accounts = 1000
[[stages]]
name = "flat"
duration_s = $seconds
rate_from = 6000
rate_to = 6000
[mix]
transfer = 1
[keys]
cross_cell_share = 0.75
PROFILE
  "$bin" stress --target "http://127.0.0.1:$2" --token "$SECRET" --profile "$work/open.toml" --report "$work/stress" --cpus 1 --quiet >/dev/null 2>&1 || true
  python3 - "$1" "$work/stress/report.json" <<'PY' || echo "$1 stress failed"
import json, sys
r = json.load(open(sys.argv[2])); g = r["generator"]; p = r["placement"]["generator"]
print(sys.argv[1], "stress requests=%d per_s=%.0f cpu_s=%.2f per_cpu_s=%.0f send_lag_max_ms=%.0f" % (g["sent_requests"],
      g["sent_requests"] / r["duration_s"], p["cpu_s"], g["requests_per_cpu_s"], g["send_lag_max_ms"]))
PY
  rm -rf "$work/stress"
}

echo "# $(date -u +%FT%TZ) cpu pressure: $(head -1 /proc/pressure/cpu 2>/dev/null || echo n/a)"
start_server 7401
curl -sf -X PUT -H "Authorization: Bearer $SECRET" -d '{"mode":"on"}' localhost:7401/v1/admin/degrade/shadow_off >/dev/null
for _ in $(seq "$rounds"); do
  wrk_run degraded 7401 256 shadow-transfer.lua | tee -a "$work/runs"
  bench_run degraded 7401 --shadow | tee -a "$work/runs"
done
stop_server
start_server 7402
for _ in $(seq "$rounds"); do
  wrk_run served 7402 256 payment.lua | tee -a "$work/runs"
  bench_run served 7402 --cross-cell 0.75 | tee -a "$work/runs"
  wrk_run open 7402 4 payment.lua | tee -a "$work/runs"
  stress_run open 7402 | tee -a "$work/runs"
done
stop_server
echo "# $(date -u +%FT%TZ) cpu pressure: $(head -1 /proc/pressure/cpu 2>/dev/null || echo n/a)"
echo "# medians of requests per CPU-second of the generator"
for case in degraded served open; do
  for tool in wrk bench stress; do
    values=$(awk -v c="$case" -v t="$tool" '$1 == c && $2 == t {for (i = 3; i <= NF; i++) if ($i ~ /^per_cpu_s=/) print substr($i, 11)}' "$work/runs" | sort -n)
    [ -z "$values" ] && continue
    n=$(wc -l <<<"$values")
    echo "$case $tool median_per_cpu_s=$(sed -n "$(((n + 1) / 2))p" <<<"$values") runs=$n"
  done
done
