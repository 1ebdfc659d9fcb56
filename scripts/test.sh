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

# Every test file runs, even after one fails (--no-fail-fast); the end of
# the output lists every failing test with its file.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --no-fail-fast 2>&1 | tee "$log" || status=$?
if [ "$status" -ne 0 ]; then
  echo >&2
  echo "== failing tests" >&2
  awk '/^ *Running /{bin = ($2 == "unittests") ? $3 : $2}
       / \.\.\. FAILED$/{sub(/^test /, ""); sub(/ \.\.\. FAILED$/, ""); print "  " bin ": " $0}
       /^error: (could not compile|[0-9]+ targets? failed)/{tail = 1}
       tail' "$log" >&2
  exit "$status"
fi
