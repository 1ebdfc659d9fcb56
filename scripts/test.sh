#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what is missing,
# then runs formatting and lint checks and every test (unit, integration
# against throwaway Postgres clusters and Redis servers, fixture and fidelity tests).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages postgresql postgresql-contrib util-linux redis-server openssl
# The search-sink tests build a small OpenSearch launcher with Maven (Java 17).
command -v java >/dev/null 2>&1 || ensure_packages openjdk-17-jdk-headless
command -v mvn >/dev/null 2>&1 || ensure_packages maven
ensure_cargo
export PGFERRY_PG_BIN="${PGFERRY_PG_BIN:-$(pg_bin)}"
# Debian's package starts a cluster of its own; the tests never use it.
echo "== using PostgreSQL binaries in $PGFERRY_PG_BIN" >&2

cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --quiet 2>&1
