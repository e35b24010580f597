#!/usr/bin/env bash
# The PostgreSQL baseline of docs/BENCHMARKS.md (b): the same payment on the
# local PostgreSQL with pgbench: two UPDATEs (payer, payee) and an INSERT of the
# idempotency key in one transaction, 1M accounts, synchronous_commit on,
# 64 clients. Usage: scripts/bench-pg.sh [SECONDS] [ACCOUNTS]
set -euo pipefail
seconds=${1:-30}
accounts=${2:-1000000}
export PGHOST=${PGHOST:-127.0.0.1} PGUSER=${PGUSER:-postgres} PGDATABASE=${PGDATABASE:-test}
psql -q -v ON_ERROR_STOP=1 <<SQL
DROP TABLE IF EXISTS bench_accounts, bench_idempotency;
CREATE TABLE bench_accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE bench_idempotency (id text PRIMARY KEY);
INSERT INTO bench_accounts SELECT g, 1000000000 FROM generate_series(1, $accounts) g;
VACUUM ANALYZE bench_accounts;
SQL
psql -At -c "SELECT name || ' = ' || setting FROM pg_settings WHERE name IN ('synchronous_commit', 'fsync', 'wal_sync_method')"
script=$(mktemp)
cat > "$script" <<SQL
\set a random(1, $accounts)
\set b random(1, $accounts)
\set payer least(:a, :b)
\set payee greatest(:a, :b)
\set amount random(1, 100)
BEGIN;
UPDATE bench_accounts SET balance = balance - :amount WHERE id = :payer;
UPDATE bench_accounts SET balance = balance + :amount WHERE id = :payee;
INSERT INTO bench_idempotency (id) VALUES (gen_random_uuid()::text);
COMMIT;
SQL
# Locking payer and payee in id order keeps the 64 clients free of deadlocks.
pgbench -n -c 64 -j 2 -T "$seconds" -r -P 10 -f "$script" 2>&1 | grep -E "tps|latency|transactions|failed"
rm -f "$script"
