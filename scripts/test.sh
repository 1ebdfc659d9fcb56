#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what is missing,
# then runs formatting and lint checks and every test (unit, integration
# against throwaway Postgres clusters and Redis servers, fixture and fidelity tests).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages postgresql postgresql-contrib util-linux redis-server openssl
# The NATS JetStream tests start Debian's nats-server -js (tests/support/nats.rs).
# Where systemd runs, the package also starts a service on port 4222; the tests never use it.
ensure_packages nats-server
# rdkafka (the Kafka sink's client) builds librdkafka from source: configure + make, TLS, zstd.
ensure_packages make perl pkg-config libssl-dev zlib1g-dev
# The Iceberg tests' readers live in a venv that tests/iceberg/setup-venv.sh makes on demand.
ensure_packages python3-venv
# The search-sink and Kafka tests build small launchers (tests/opensearch, tests/kafka)
# with Maven (Java 17) on first use.
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
# The Iceberg sink sits behind the `iceberg` cargo feature (its dependencies
# take minutes to build): its one test binary, with the feature.
cargo test --features iceberg --test iceberg_sink 2>&1 | tee -a "$log" || status=$?
if [ "$status" -ne 0 ]; then
  echo >&2
  echo "== failing tests" >&2
  awk '/^ *Running /{bin = ($2 == "unittests") ? $3 : $2}
       / \.\.\. FAILED$/{sub(/^test /, ""); sub(/ \.\.\. FAILED$/, ""); print "  " bin ": " $0}
       /^error: (could not compile|[0-9]+ targets? failed)/{tail = 1}
       tail' "$log" >&2
  exit "$status"
fi
