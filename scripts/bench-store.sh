#!/usr/bin/env bash
# Cells on PostgreSQL (`--store postgres://…`) against cells on the embedded
# store, both as a many-process cluster (`cellpay up`, one router), in the
# same run, alternating: single-transfer throughput at saturation (`bench
# http`, 512 connections) and the CPU of the server processes and of
# PostgreSQL.
#
#   scripts/bench-store.sh [CELLS] [ROUNDS]      (BIN=path overrides the binary)
#
# Needs a release build (cargo build --release) and the machine's PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
CELLS=${1:-3}
ROUNDS=${2:-3}
BIN=${BIN:-$PWD/target/release/cellpay}
TOKEN=bench-store-admin-0001
PORT=7393
CONTROL=cellpay_bench_store_control
STORE=cellpay_bench_store_cells
work=$(mktemp -d)
trap 'pkill -f "listen 127.0.0.1:$PORT" || true; rm -rf "$work"; drop' EXIT

psql_admin() { psql -h 127.0.0.1 -U root -d postgres -qc "$1" >/dev/null 2>&1 || true; }
drop() { psql_admin "DROP DATABASE IF EXISTS $CONTROL WITH (FORCE)"; psql_admin "DROP DATABASE IF EXISTS $STORE WITH (FORCE)"; }
cpu_of() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

one() {
  local mode=$1 dir="$work/$1-$RANDOM" store=embedded
  mkdir -p "$dir"
  drop
  if [ "$mode" = postgres ]; then
    psql_admin "CREATE DATABASE $STORE"
    store="postgres://root@127.0.0.1:5432/$STORE"
  fi
  "$BIN" up --listen 127.0.0.1:$PORT --cells "$CELLS" --routers 1 --data-dir "$dir" --token "admin:$TOKEN" \
    --control "postgres://root@127.0.0.1:5432/$CONTROL" --store "$store" >"$dir/out" 2>&1 &
  for _ in $(seq 150); do curl -sf "127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
  "$BIN" bench http --target "http://127.0.0.1:$PORT" --token "$TOKEN" --cells "$CELLS" --accounts 100000 \
    --seconds 12 --connections 512 >"$dir/bench" 2>&1 &
  local bench=$!
  while ! grep -q "measuring" "$dir/bench" 2>/dev/null && kill -0 $bench 2>/dev/null; do sleep 0.5; done
  sleep 4
  local pids t0=() t1 total=0 pg0 pg1
  pids=$(pgrep -f "$BIN (cell|router) " || true)
  for p in $pids; do t0+=("$(cpu_of "$p")"); done
  pg0=$(for p in $(pgrep -f "postgres: .*$STORE" || true); do cpu_of "$p"; done | awk '{s+=$1} END {print s+0}')
  sleep 5
  local i=0
  for p in $pids; do t1=$(cpu_of "$p"); total=$((total + t1 - t0[i])); i=$((i + 1)); done
  pg1=$(for p in $(pgrep -f "postgres: .*$STORE" || true); do cpu_of "$p"; done | awk '{s+=$1} END {print s+0}')
  wait $bench
  local tps
  tps=$(grep -oE "^ +[0-9]+ transfers/s" "$dir/bench" | grep -oE "[0-9]+")
  echo "$mode $tps $(echo "scale=2; $total / 500" | bc) $(echo "scale=2; ($pg1 - $pg0) / 500" | bc)"
  pkill -f "listen 127.0.0.1:$PORT" || true
  sleep 2
}

echo "store transfers_per_s cellpay_cores postgres_cores" >&2
results=()
for _ in $(seq "$ROUNDS"); do
  results+=("$(one embedded)")
  results+=("$(one postgres)")
done
printf '%s\n' "${results[@]}"
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
e=$(printf '%s\n' "${results[@]}" | awk '$1=="embedded"{print $2}' | median)
p=$(printf '%s\n' "${results[@]}" | awk '$1=="postgres"{print $2}' | median)
echo "cells $CELLS: embedded median $e/s, postgres median $p/s, ratio $(echo "scale=2; $p / $e" | bc)"
