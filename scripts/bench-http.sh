#!/usr/bin/env bash
# The HTTP benchmarks of docs/BENCHMARKS.md, side by side in one run:
#  (a) cellpay, single-transfer POSTs, 256 connections, 1M accounts, 20 % cross-cell
#  (a0) the same with 0 % cross-cell (what crossing cells costs)
#  (b) PostgreSQL: the same payment with pgbench, 64 clients, synchronous_commit on
#  (c) cellpay's batch endpoint, 8,190 transfers per request
# Usage: scripts/bench-http.sh [SECONDS] [ACCOUNTS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
accounts=${2:-1000000}
cargo build --release -q -p cellpay
bin=target/release/cellpay
echo "## (a) cellpay single transfers, 256 connections, 20 % cross-cell"
"$bin" bench http --accounts "$accounts" --connections 256 --seconds "$seconds" --cross-cell 0.2 --json
echo "## (a0) cellpay single transfers, 256 connections, 0 % cross-cell"
"$bin" bench http --accounts "$accounts" --connections 256 --seconds "$seconds" --cross-cell 0 --json
echo "## (b) PostgreSQL (pgbench), 64 clients"
scripts/bench-pg.sh "$seconds" "$accounts"
echo "## (c) cellpay batch endpoint, 8,190 transfers per request, 4 connections, 20 % cross-cell"
"$bin" bench http --accounts "$accounts" --connections 4 --batch 8190 --seconds "$seconds" --cross-cell 0.2 --json
