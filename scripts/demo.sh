#!/usr/bin/env bash
# One-command demo on a fresh Debian machine: installs what is missing, starts
# a throwaway PostgreSQL with wal_level=logical, creates a demo table, runs a
# small workload and streams the changes with pgferry to stdout as JSON lines.
# Stops by itself after DEMO_SECONDS (default 15) and cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages postgresql util-linux
ensure_cargo
echo "== building pgferry (release; the first build takes a few minutes)" >&2
cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/pgferry"
PGBIN="$(pg_bin)"

WORK="$(mktemp -d /tmp/pgferry-demo.XXXXXX)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT="$(free_port)"
METRICS_PORT="$(free_port)"   # the default 9187 may be taken
RUN=()
if [ "$(id -u)" = 0 ]; then
  chown postgres: "$WORK"
  RUN=(runuser -u postgres --)
fi
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  "${RUN[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== starting a throwaway PostgreSQL on 127.0.0.1:$PORT" >&2
"${RUN[@]}" "$PGBIN/initdb" -D "$WORK/data" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
cat >>"$WORK/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$WORK'
wal_level = logical
logical_decoding_work_mem = 64kB
CONF
"${RUN[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/server.log" -w start >/dev/null
PSQL=("$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1)
"${PSQL[@]}" -c "CREATE TABLE products (id int PRIMARY KEY, name text, price numeric(10,2), tags text[], attrs jsonb, updated_at timestamptz DEFAULT now())"
# Rows that exist before pgferry: the initial snapshot delivers them as "read" events.
"${PSQL[@]}" -c "INSERT INTO products (id, name, price) SELECT g, 'existing ' || g, g + 0.5 FROM generate_series(90001, 90003) g"

cat >"$WORK/pgferry.toml" <<TOML
[source]
url = "postgres://postgres@127.0.0.1:$PORT/postgres"
slot = "pgferry"
publication = "pgferry"
tables = ["public.products"]
snapshot = "initial"

[checkpoint]
dir = "$WORK/state"

[metrics]
listen = "127.0.0.1:$METRICS_PORT"

[[sink]]
name = "changes"
type = "jsonl"
path = "-"
TOML

echo "== pgferry run --config $WORK/pgferry.toml  (change events on stdout; metrics on http://127.0.0.1:$METRICS_PORT/metrics)" >&2
"$BIN" --log-format text run --config "$WORK/pgferry.toml" &
PIDS+=($!)
until [ "$("${PSQL[@]}" -Atc "SELECT count(*) FROM pg_replication_slots WHERE active")" = 1 ]; do sleep 0.2; done

echo "== workload: inserts, updates, deletes, a key change and a streamed large transaction" >&2
END=$((SECONDS + ${DEMO_SECONDS:-15}))
i=0
while [ $SECONDS -lt $END ]; do
  i=$((i + 1))
  "${PSQL[@]}" -c "INSERT INTO products (id, name, price, tags, attrs) VALUES ($i, 'item $i', $i.99, '{demo,\"tag $i\"}', '{\"color\": \"blue\", \"n\": $i}')"
  "${PSQL[@]}" -c "UPDATE products SET price = price * 2 WHERE id = $i"
  if [ $((i % 3)) = 0 ]; then "${PSQL[@]}" -c "DELETE FROM products WHERE id = $((i - 1))"; fi
  if [ "$i" = 5 ]; then "${PSQL[@]}" -c "UPDATE products SET id = 1000 WHERE id = 1"; fi
  sleep 1
done
"${PSQL[@]}" -c "BEGIN; INSERT INTO products (id, name, price) SELECT g, 'bulk', 1 FROM generate_series(10001, 10500) g; COMMIT;" >/dev/null
sleep 2
echo "== stopping pgferry (SIGTERM: finishes the batch, checkpoints, exits 0)" >&2
kill -TERM "${PIDS[0]}"
wait "${PIDS[0]}"
PIDS=()
echo "== checkpoint: $(cat "$WORK/state/changes.checkpoint.json" | tr -d '\n ')" >&2
