#!/usr/bin/env bash
# End-to-end throughput against the physical limit, all in one run so the
# ratios are meaningful on a noisy machine:
#   1. the server's own decode, no network: pg_logical_slot_peek_binary_changes
#   2. pg_recvlogical (pgoutput, the same options) to /dev/null
#   3. pgferry (release) into the null sink, and into a JSONL file
# Every consumer has its own slot, all created at the same LSN before the
# workload. Prints a Markdown table. ROWS scales the workload (default 1M).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_packages postgresql util-linux time
ensure_cargo
cargo build --release --quiet
BIN="$PWD/target/release/pgferry"
PGBIN="$(pg_bin)"
ROWS="${ROWS:-1000000}"

WORK="$(mktemp -d /tmp/pgferry-bench.XXXXXX)"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
RUN=()
if [ "$(id -u)" = 0 ]; then chown postgres: "$WORK"; RUN=(runuser -u postgres --); fi
cleanup() {
  "${RUN[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
"${RUN[@]}" "$PGBIN/initdb" -D "$WORK/data" -U postgres --auth=trust -E UTF8 --locale=C --no-sync >/dev/null
cat >>"$WORK/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$WORK'
wal_level = logical
max_wal_size = 4GB
shared_buffers = 512MB
fsync = off
synchronous_commit = off
logical_decoding_work_mem = 64MB
CONF
"${RUN[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/server.log" -w start >/dev/null
PSQL=("$PGBIN/psql" -X -q -At -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1)
OPTS="proto_version '2', publication_names 'bench', messages 'true', streaming 'on'"

"${PSQL[@]}" <<'SQL'
CREATE TABLE items (id bigint PRIMARY KEY, sku text, name text, price numeric(10,2), stock int, tags text[], attrs jsonb, updated_at timestamptz);
CREATE TABLE marker (id int PRIMARY KEY);
CREATE PUBLICATION bench FOR TABLE items, marker;
SELECT pg_create_logical_replication_slot(s, 'pgoutput') FROM unnest(array['peek','recv','ferry_null','ferry_jsonl']) s;
SQL

# The workload: inserts in transactions of mixed sizes, one large transaction,
# then updates and deletes. About ROWS row changes in all.
N=$ROWS
INS=$((N * 55 / 100)); BIG=$((N * 15 / 100)); UPD=$((N * 20 / 100)); DEL=$((N * 10 / 100))
echo "== workload: $INS inserts in small/medium transactions, one transaction of $BIG inserts, $UPD updates, $DEL deletes" >&2
"${PSQL[@]}" <<SQL
DO \$\$
DECLARE i bigint := 0; sz int;
BEGIN
  WHILE i < $INS LOOP
    sz := CASE WHEN i % 7 = 0 THEN 1000 WHEN i % 3 = 0 THEN 50 ELSE 5 END;
    INSERT INTO items SELECT g, 'SKU-' || g, 'item number ' || g, (g % 10000) / 100.0, g % 500,
      ARRAY['tag' || (g % 10), 'x'], jsonb_build_object('color', 'c' || (g % 7), 'size', g % 40), now()
    FROM generate_series(i + 1, least(i + sz, $INS)) g;
    i := i + sz;
    COMMIT;
  END LOOP;
END \$\$;
BEGIN;
INSERT INTO items SELECT g, 'SKU-' || g, 'big ' || g, 1.5, 1, '{big}', '{"big": true}', now() FROM generate_series($INS + 1, $INS + $BIG) g;
COMMIT;
DO \$\$
DECLARE i bigint := 0;
BEGIN
  WHILE i < $UPD LOOP
    UPDATE items SET stock = stock + 1, updated_at = now() WHERE id > i AND id <= i + 100;
    i := i + 100;
    COMMIT;
  END LOOP;
  i := 0;
  WHILE i < $DEL LOOP
    DELETE FROM items WHERE id > $INS + i AND id <= $INS + i + 100;
    i := i + 100;
    COMMIT;
  END LOOP;
END \$\$;
SQL
UNTIL="$("${PSQL[@]}" -c "SELECT pg_current_wal_insert_lsn()")"
"${PSQL[@]}" -c "SET synchronous_commit = on; INSERT INTO marker VALUES (1)"
END="$("${PSQL[@]}" -c "SELECT pg_current_wal_insert_lsn()")"
CHANGES=$((INS + BIG + UPD + DEL + 1))
WAL="$("${PSQL[@]}" -c "SELECT pg_size_pretty(pg_wal_lsn_diff('$END', confirmed_flush_lsn)) FROM pg_replication_slots WHERE slot_name='peek'")"
echo "== $CHANGES row changes, $WAL of WAL to decode (until $UNTIL, end $END)" >&2

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }

t0=$(now)
MSGS="$("${PSQL[@]}" -c "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('peek', '$END', NULL, 'proto_version', '2', 'publication_names', 'bench', 'messages', 'true', 'streaming', 'on')")"
t1=$(now); PEEK=$(secs "$t0" "$t1")

RWRAP=()
if [ -n "${PERF_DIR:-}" ]; then RWRAP=(perf record -q -a -e cpu-clock -F 2000 -g -o "$PERF_DIR/recv.perf.data" --); fi
t0=$(now)
"${RWRAP[@]}" "$PGBIN/pg_recvlogical" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres --slot recv --start -E "$END" --no-loop -f /dev/null \
  -o proto_version=2 -o publication_names=bench -o messages=true -o streaming=on
t1=$(now); RECV=$(secs "$t0" "$t1")

ferry() { # slot sink-toml
  cat >"$WORK/$1.toml" <<TOML
[source]
url = "postgres://postgres@127.0.0.1:$PORT/postgres"
slot = "$1"
publication = "bench"
tables = ["public.items", "public.marker"]
${FERRY_SOURCE_EXTRA:-}
[checkpoint]
dir = "$WORK/state-$1"
$2
TOML
  local wrap=()
  if [ -n "${PERF_DIR:-}" ]; then wrap=(perf record -q -a -e cpu-clock -F 2000 -g -o "$PERF_DIR/$1.perf.data" --); fi
  /usr/bin/time -f "%M" -o "$WORK/$1.rss" "${wrap[@]}" "$BIN" --log-format json run --config "$WORK/$1.toml" --until "$UNTIL" 2>"$WORK/$1.log"
}
t0=$(now); ferry ferry_null $'[[sink]]\nname = "null"\ntype = "null"'; t1=$(now); NULLS=$(secs "$t0" "$t1")
t0=$(now); ferry ferry_jsonl $'[[sink]]\nname = "jsonl"\ntype = "jsonl"\npath = "'"$WORK"'/out.jsonl"'; t1=$(now); JSONLS=$(secs "$t0" "$t1")
LINES=$(wc -l <"$WORK/out.jsonl")
reads() { grep -o '"reads":[0-9]*' "$WORK/$1.log" | tail -1 | cut -d: -f2; }
echo "== pgferry read() calls: null $(reads ferry_null), jsonl $(reads ferry_jsonl)" >&2
[ "$LINES" -ge "$CHANGES" ] || { echo "pgferry wrote $LINES lines, expected $CHANGES" >&2; exit 1; }

rate() { python3 -c "print(f'{$CHANGES / $1:,.0f}')"; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
cat <<MD
| consumer | seconds | changes/s | vs pg_recvlogical | vs server decode | peak RSS |
|---|---:|---:|---:|---:|---:|
| server-side decode (peek, no network; $MSGS messages) | $PEEK | $(rate "$PEEK") | $(ratio "$RECV" "$PEEK")× | 1.00× | – |
| pg_recvlogical → /dev/null | $RECV | $(rate "$RECV") | 1.00× | $(ratio "$PEEK" "$RECV")× | – |
| pgferry → null sink | $NULLS | $(rate "$NULLS") | $(ratio "$RECV" "$NULLS")× | $(ratio "$PEEK" "$NULLS")× | $(( $(cat "$WORK/ferry_null.rss") / 1024 )) MB |
| pgferry → JSONL file | $JSONLS | $(rate "$JSONLS") | $(ratio "$RECV" "$JSONLS")× | $(ratio "$PEEK" "$JSONLS")× | $(( $(cat "$WORK/ferry_jsonl.rss") / 1024 )) MB |

$CHANGES row changes ($WAL of WAL); ratios are throughput ratios from the same run.
MD
