#!/usr/bin/env bash
# The many-process cluster (`cellpay up`: cells and one router as processes)
# against the one-process cluster (`cellpay serve`) with the same cells, in
# the same run, alternating: single-transfer throughput at saturation
# (`bench http`, 512 connections) and each side's CPU.
#
#   scripts/bench-processes.sh [CELLS] [ROUNDS]
#
# Needs a release build (cargo build --release) and the machine's PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
CELLS=${1:-3}
ROUNDS=${2:-3}
BIN=$PWD/target/release/cellpay
TOKEN=bench-processes-admin-0001
PORT=7391
DB=cellpay_bench_processes
work=$(mktemp -d)
trap 'pkill -f "listen 127.0.0.1:$PORT" || true; rm -rf "$work"' EXIT

cpu_of() { awk '{print $14+$15}' "/proc/$1/stat"; }

one() {
  local mode=$1 dir="$work/$1-$RANDOM"
  mkdir -p "$dir"
  psql -h 127.0.0.1 -U root -d postgres -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  if [ "$mode" = serve ]; then
    "$BIN" serve --listen 127.0.0.1:$PORT --cells "$CELLS" --data-dir "$dir" --token "admin:$TOKEN" >"$dir/out" 2>&1 &
  else
    "$BIN" up --listen 127.0.0.1:$PORT --cells "$CELLS" --routers 1 --data-dir "$dir" --token "admin:$TOKEN" \
      --control "postgres://root@127.0.0.1:5432/$DB" >"$dir/out" 2>&1 &
  fi
  for _ in $(seq 100); do curl -sf "127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
  "$BIN" bench http --target "http://127.0.0.1:$PORT" --token "$TOKEN" --cells "$CELLS" --accounts 100000 \
    --seconds 12 --connections 512 >"$dir/bench" 2>&1 &
  local bench=$!
  # Sample CPU inside the measured window (setup opens and funds the accounts first).
  while ! grep -q "measuring" "$dir/bench" 2>/dev/null && kill -0 $bench 2>/dev/null; do sleep 0.5; done
  sleep 4
  local pids t0=() t1=() total=0
  pids=$(pgrep -f "cellpay (serve|cell|router) " || true)
  for p in $pids; do t0+=("$(cpu_of "$p")"); done
  sleep 5
  local i=0
  for p in $pids; do t1=$(cpu_of "$p"); total=$((total + t1 - t0[i])); i=$((i + 1)); done
  wait $bench
  local tps
  tps=$(grep -oE "^ +[0-9]+ transfers/s" "$dir/bench" | grep -oE "[0-9]+")
  echo "$mode $tps $(echo "scale=2; $total / 500" | bc)"
  pkill -f "listen 127.0.0.1:$PORT" || true
  sleep 2
}

echo "mode transfers_per_s server_cores" >&2
results=()
for _ in $(seq "$ROUNDS"); do
  results+=("$(one serve)")
  results+=("$(one up)")
done
printf '%s\n' "${results[@]}"
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
s=$(printf '%s\n' "${results[@]}" | awk '$1=="serve"{print $2}' | median)
u=$(printf '%s\n' "${results[@]}" | awk '$1=="up"{print $2}' | median)
echo "cells $CELLS: serve median $s/s, up median $u/s, ratio $(echo "scale=2; $u / $s" | bc)"
