#!/usr/bin/env bash
# What a refusal costs the server against a served payment, and what the
# group-commit linger saves (docs/BENCHMARKS.md, "Cheap refusals and group commit").
# Server pinned to CPU 0, wrk on CPU 1; a fresh server per line:
#  refused: shadow transfers with shadow_off on (503 degraded, refused at the front gate)
#  paid:    payments, a fresh id each, 3 of 4 to another cell (scripts/wrk/payment.lua)
# Each line gives server CPU-us per request (whole process, from /proc/PID/stat),
# payments/s, fsyncs and wrk's p99. Usage:
#   scripts/refusal-cost.sh [ROUNDS] [SECONDS] [BASE_BINARY]
# With BASE_BINARY (an older build), its lines alternate with this build's.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
seconds=${2:-10}
base=${3:-}
cargo build --release -q -p cellpay
bin=$PWD/target/release/cellpay
work=$(mktemp -d)
export SECRET=refusal-cost-$RANDOM-0123456789abcdef
server=
trap 'if [ -n "$server" ]; then kill "$server"; fi; rm -rf "$work"' EXIT
A="Authorization: Bearer $SECRET"
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; } # clock ticks, user + system
tick=$(getconf CLK_TCK)
fsyncs() { curl -s "localhost:$1/metrics" | awk '/^cellpay_cell_fsyncs_total/ {s += $2} END {print s + 0}'; }

run() { # LABEL BINARY LINGER_US PORT
  local label=$1 b=$2 linger=$3 port=$4
  CELLPAY_BATCH_LINGER_US=$linger RUST_LOG=error taskset -c 0 "$b" serve --listen "127.0.0.1:$port" \
    --data-dir "$work/data-$port" --token "admin:$SECRET" >/dev/null 2>&1 &
  server=$!
  sleep 2
  "$bin" bench http --target "http://127.0.0.1:$port" --token "$SECRET" --accounts 1000 --seconds 1 --connections 8 --json >/dev/null 2>&1
  curl -s -X PUT -H "$A" -d '{"mode":"on"}' "localhost:$port/v1/admin/degrade/shadow_off" >/dev/null
  local c0 out n c1
  c0=$(cpu $server)
  out=$(taskset -c 1 wrk -t1 -c256 -d"${seconds}s" -s scripts/wrk/shadow-transfer.lua "http://127.0.0.1:$port/v1/transfers")
  c1=$(cpu $server)
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  local refuse_us=$(( (c1 - c0) * 1000000 / tick / n ))
  curl -s -X PUT -H "$A" -d '{"mode":"off"}' "localhost:$port/v1/admin/degrade/shadow_off" >/dev/null
  local f0 f1 m p99 rps
  f0=$(fsyncs $port); c0=$(cpu $server)
  out=$(taskset -c 1 wrk -t1 -c256 -d"${seconds}s" --latency -s scripts/wrk/payment.lua "http://127.0.0.1:$port/v1/transfers")
  c1=$(cpu $server); f1=$(fsyncs $port)
  m=$(echo "$out" | awk '/requests in/ {print $1}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  rps=$(echo "$out" | awk '/Requests\/sec/ {print int($2)}')
  echo "$label refused_us=$refuse_us paid_us=$(( (c1 - c0) * 1000000 / tick / m )) payments_per_s=$rps fsyncs=$((f1 - f0)) p99=$p99"
  kill $server; wait $server || true; server=
}

port=7500
for r in $(seq "$rounds"); do
  if [ -n "$base" ]; then run base "$base" 0 $((port++)); fi
  run linger-0 "$bin" 0 $((port++))
  run linger-2ms "$bin" 2000 $((port++))
done
