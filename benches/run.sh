#!/usr/bin/env bash
# All of pgferry's system benchmarks in one run, so that every ratio compares
# figures measured minutes apart on the same (noisy) machine:
#
#   e2e       the server's own decode (peek, text and binary), pg_recvlogical
#             (TCP, Unix socket, binary), pgferry into null (TCP, Unix socket)
#             and into JSONL, with peak RSS; pgferry with binary values (an
#             experiment, PGFERRY_EXPERIMENT_BINARY), output checked identical
#   binary    the binary-values experiment against to_jsonb() on edge values
#   redis     pgferry into Redis, json and hash modes (throwaway redis-server)
#   nats      pgferry into NATS JetStream (Debian's nats-server -js, file
#             store), messages counted in the stream, against pgferry → JSONL
#   search    pgferry into OpenSearch 2.19 (tests/opensearch) against a direct
#             `_bulk` load of the same changes in batches of the same size
#   latency   commit -> visible in Redis at a steady 1,000 transactions/s
#   memory    peak RSS while one transaction of 2M rows goes through
#   snapshot  an initial snapshot of a 1M-row table against COPY TO /dev/null
#             (needs `pgferry run --exit-after-snapshot`; "n/a" without it)
#   kafka     (opt-in: BENCHES=kafka) pgferry into Kafka (embedded 4.4 broker,
#             tests/kafka) with exactly_once false and true, against JSONL, with
#             peak RSS and records counted; commit -> read_committed consumer
#             latency at KAFKA_LAT_TPS (default 1,000) transactions/s
#   cpu       (opt-in: BENCHES=cpu) issue 14: on the same WAL, pg_recvlogical
#             → /dev/null and pgferry → null and → JSONL over TCP, quiet and
#             under a fixed load of its own (a busy loop pinned to CPU 1):
#             time, own CPU (user+sys), the walsender's CPU and the data
#             segments its socket sent (per socket, from `ss`), pgferry's
#             reads, peak RSS; JSONL checked identical across builds.
#             BIN_BEFORE=<an earlier pgferry binary> adds it to every round.
#   tls       pgferry over TLS (sslmode=verify-full) against plain TCP, into
#             null and into JSONL, on the same WAL: time, CPU (user+sys) of
#             pgferry and of the server's walsender. The server then has
#             ssl = on; every other consumer keeps sslmode=disable, so the
#             other parts measure what they measure without it.
#
# Every consumer of the main workload has its own pgoutput slot, all created
# at the same LSN before the workload. Prints Markdown and writes it to $OUT.
#
# Knobs (environment):
#   ROWS=1000000         row changes in the main workload
#   BENCHES="e2e binary redis nats search latency memory snapshot tls"   which parts to run
#   BIG_TXN_ROWS=2000000 rows of the one transaction of the memory part
#   SNAP_ROWS=1000000    rows of the snapshot table
#   REPEAT=3             rounds of the e2e and Redis consumers (medians reported)
#   LAT_SECS=15 LAT_TPS=1000   the latency run
#   OUT=<target dir>/pgferry-bench/results.md
#   FERRY_SOURCE_EXTRA   extra [source] lines for every pgferry run (experiments)
#   FERRY_EXTRA          extra lines at the end of every pgferry run's config
#                        (e.g. $'[pipeline]\nworker_threads = 2'), latency run included
#   BIN                  a pgferry binary to measure instead of building this tree
#   BIN_BEFORE, CPU_CONSUMERS, CPU_SRC_<tag>, CPU_CFG_<tag>   the cpu part (below)
#   SNAPSHOT_EXTRA       extra lines at the end of the snapshot runs' config
#                        (e.g. $'[snapshot]\nchunk_rows = 100000')
#   PG_EXTRA_CONF        extra postgresql.conf lines
#   KAFKA_LINGER_MS=5    linger.ms of the Kafka runs
#   PERF_DIR             record `perf` profiles of the e2e consumers there
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
. scripts/lib.sh
ensure_packages postgresql util-linux time redis-server curl
ensure_cargo
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ -z "${BIN:-}" ]; then cargo build --release --quiet; BIN="$TARGET/release/pgferry"; fi
PGBIN="$(pg_bin)"
ROWS="${ROWS:-1000000}"
BENCHES="${BENCHES:-e2e binary redis nats search latency memory snapshot tls}"
BIG_TXN_ROWS="${BIG_TXN_ROWS:-2000000}"
SNAP_ROWS="${SNAP_ROWS:-1000000}"
LAT_SECS="${LAT_SECS:-15}"
LAT_TPS="${LAT_TPS:-1000}"
KAFKA_LAT_TPS="${KAFKA_LAT_TPS:-1000}"
REPEAT="${REPEAT:-3}"
# The cpu part's consumers: recv is pg_recvlogical; TAG_SINK (sink null or
# jsonl) is pgferry: TAG "after" this build with its defaults, "before"
# $BIN_BEFORE (an earlier build; skipped when unset), any other TAG this
# build with the [source] lines of $CPU_SRC_TAG and the lines of
# $CPU_CFG_TAG at the end of its config.
BIN_BEFORE="${BIN_BEFORE:-}"
CPU_CONSUMERS="${CPU_CONSUMERS:-recv before_null before_jsonl after_null after_jsonl w1_null w1_jsonl pace500_jsonl rcv256_jsonl}"
[ -n "$BIN_BEFORE" ] || CPU_CONSUMERS="$(for c in $CPU_CONSUMERS; do [[ $c == before_* ]] || echo "$c"; done)"
CPU_CFG_w1="${CPU_CFG_w1:-$'[pipeline]\nworker_threads = 1'}"
# The read-side levers, measured on top of one thread.
CPU_SRC_pace500="${CPU_SRC_pace500:-read_pace_us = 500}"; CPU_CFG_pace500="${CPU_CFG_pace500:-$CPU_CFG_w1}"
CPU_SRC_rcv256="${CPU_SRC_rcv256:-recv_buffer_kb = 256}"; CPU_CFG_rcv256="${CPU_CFG_rcv256:-$CPU_CFG_w1}"
mkdir -p "$TARGET/pgferry-bench"
OUT="${OUT:-$TARGET/pgferry-bench/results.md}"
want() { [[ " $BENCHES " == *" $1 "* ]]; }
log() { echo "== $*" >&2; }

# Python with psycopg and redis, for the latency driver and the direct _bulk load.
PY="$TARGET/pgferry-bench/venv/bin/python"
if (want latency || want search) && ! "$PY" -c 'import psycopg, redis' 2>/dev/null; then
  log "creating $TARGET/pgferry-bench/venv (psycopg, redis)"
  python3 -m venv "$TARGET/pgferry-bench/venv"
  "$TARGET/pgferry-bench/venv/bin/pip" install -q 'psycopg[binary]' redis
fi

if want kafka && ! "$PY" -c 'import psycopg, confluent_kafka' 2>/dev/null; then
  log "adding psycopg and confluent-kafka to $TARGET/pgferry-bench/venv"
  [ -x "$PY" ] || python3 -m venv "$TARGET/pgferry-bench/venv"
  "$TARGET/pgferry-bench/venv/bin/pip" install -q 'psycopg[binary]' confluent-kafka
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
WORK="$(mktemp -d /tmp/pgferry-bench.XXXXXX)"
chmod 755 "$WORK"
PORT="$(free_port)"
RUN=()
if [ "$(id -u)" = 0 ]; then chown postgres: "$WORK"; RUN=(runuser -u postgres --); fi
# TCP URL of the plain consumers. With the tls part the server has ssl = on,
# so they (and psql, pg_recvlogical, psycopg through PGSSLMODE) say disable.
PLAIN_URL="postgres://postgres@127.0.0.1:$PORT/postgres"
TLS_CONF=""
if want tls; then
  PLAIN_URL+="?sslmode=disable"
  export PGSSLMODE=disable
  # A private CA and a server certificate for localhost and 127.0.0.1.
  TLSD="$WORK/tls"; mkdir -p "$TLSD"
  (cd "$TLSD"
    EC=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    openssl req -x509 "${EC[@]}" -keyout ca.key -out ca.pem -days 2 -subj "/CN=pgferry bench CA" 2>/dev/null
    openssl req "${EC[@]}" -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' >ext.cnf
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext.cnf 2>/dev/null
    chmod 600 server.key ca.key)
  [ "$(id -u)" = 0 ] && chown -R postgres: "$TLSD"
  TLS_CONF="ssl = on
ssl_cert_file = '$TLSD/server.pem'
ssl_key_file = '$TLSD/server.key'"
  TLS_URL="postgres://postgres@localhost:$PORT/postgres?sslmode=verify-full&sslrootcert=$TLSD/ca.pem"
fi
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  "${RUN[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  sleep 1
  if [ -n "${KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
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
logical_decoding_work_mem = 64MB
max_replication_slots = $((REPEAT * 30 + 10))
max_wal_senders = 20
$TLS_CONF
${PG_EXTRA_CONF:-}
CONF
"${RUN[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/server.log" -w start >/dev/null
# The script's own sessions (workload, set-up) commit asynchronously, for
# speed; the server default stays synchronous_commit = on, which is what
# pgferry's own writes (snapshot watermarks) see.
PSQL=(env PGOPTIONS="-c synchronous_commit=off" "$PGBIN/psql" -X -q -At -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1)
PGVERSION="$("${PSQL[@]}" -c 'SHOW server_version')"

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }
rate() { python3 -c "print(f'{$1 / $2:,.0f}')"; }    # count seconds
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }    # a b -> a/b
ge() { python3 -c "import sys; sys.exit(0 if $1 >= $2 else 1)"; }
met() { if ge "$1" "$2"; then echo "met"; else echo "**not met**"; fi; }   # value goal (higher is better)
met_le() { if ge "$2" "$1"; then echo "met"; else echo "**not met**"; fi; } # value goal (lower is better)

SLOTS=(peek search)
for r in $(seq "$REPEAT"); do
  SLOTS+=("recv_$r" "recv_unix_$r" "recv_bin_$r" "ferry_null_$r" "ferry_null_unix_$r" "ferry_jsonl_$r" "redis_json_$r" "redis_hash_$r"
    "ferry_null_bin_$r" "ferry_jsonl_bin_$r" "ferry_null_unix1_$r" "ferry_jsonl_unix1_$r" "ferry_jsonl_tcp1_$r")
  if want tls; then SLOTS+=("tls_null_plain_$r" "tls_null_$r" "tls_jsonl_plain_$r" "tls_jsonl_$r"); fi
  if want cpu; then for m in quiet load; do for c in $CPU_CONSUMERS; do SLOTS+=("cpu_${m}_${c}_$r"); done; done; fi
  if want nats; then SLOTS+=("nats_$r"); fi
  if want kafka; then SLOTS+=("kafka_alo_$r" "kafka_eo_$r"); fi
done
"${PSQL[@]}" >/dev/null <<SQL
CREATE TABLE items (id bigint PRIMARY KEY, sku text, name text, price numeric(10,2), stock int, tags text[], attrs jsonb, updated_at timestamptz);
CREATE TABLE marker (id int PRIMARY KEY);
CREATE PUBLICATION bench FOR TABLE items, marker;
SELECT pg_create_logical_replication_slot(s, 'pgoutput') FROM unnest(string_to_array('${SLOTS[*]}', ' ')) s;
SQL

# The workload: inserts in transactions of mixed sizes, one large transaction,
# then updates and deletes. About ROWS row changes in all.
N=$ROWS
INS=$((N * 55 / 100)); BIG=$((N * 15 / 100)); UPD=$((N * 20 / 100)); DEL=$((N * 10 / 100))
log "workload: $INS inserts in small/medium transactions, one transaction of $BIG inserts, $UPD updates, $DEL deletes"
t0=$(now)
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
LIVE=$((INS + BIG - DEL))
WAL="$("${PSQL[@]}" -c "SELECT pg_size_pretty(pg_wal_lsn_diff('$END', confirmed_flush_lsn)) FROM pg_replication_slots WHERE slot_name='peek'")"
log "$CHANGES row changes, $WAL of WAL (workload took $(secs "$t0" "$(now)") s; until $UNTIL, end $END)"

# ferry NAME SLOT SINK-TOML [URL] [TABLES] [PUBLICATION]: pgferry (release) from
# SLOT up to $UNTIL; wall time in $WORK/NAME.secs, peak RSS (KiB) in NAME.rss,
# CPU seconds (user+sys) in NAME.cpu.
ferry() {
  local name=$1 slot=$2 sink=$3
  local url=${4:-$PLAIN_URL}
  local tables=${5:-'"public.items", "public.marker"'} pub=${6:-bench} until=${UNTIL_OVERRIDE:-$UNTIL}
  cat >"$WORK/$name.toml" <<TOML
[source]
url = "$url"
slot = "$slot"
publication = "$pub"
tables = [$tables]
${FERRY_SOURCE_EXTRA:-}
[checkpoint]
dir = "$WORK/state-$name"
$sink
${FERRY_EXTRA:-}
TOML
  local wrap=()
  if [ -n "${PERF_DIR:-}" ]; then wrap=(perf record -q -a -e cpu-clock -F 2000 -g -o "$PERF_DIR/$name.perf.data" --); fi
  local t0 t1
  t0=$(now)
  /usr/bin/time -f "%M %U %S" -o "$WORK/$name.time" "${wrap[@]}" "${FERRY_BIN:-$BIN}" --log-format json run --config "$WORK/$name.toml" --until "$until" 2>"$WORK/$name.log" \
    || { echo "pgferry ($name) failed:" >&2; tail -5 "$WORK/$name.log" >&2; return 1; }
  t1=$(now)
  secs "$t0" "$t1" >"$WORK/$name.secs"
  local rss usr sys; read -r rss usr sys <"$WORK/$name.time"
  echo "$rss" >"$WORK/$name.rss"
  python3 -c "print(f'{$usr + $sys:.2f}')" >"$WORK/$name.cpu"
}
fsecs() { cat "$WORK/$1.secs"; }
frss() { echo "$(( $(cat "$WORK/$1.rss") / 1024 )) MB"; }

recv() { # slot host extra-options...
  local slot=$1 host=$2; shift 2
  "$PGBIN/pg_recvlogical" -h "$host" -p "$PORT" -U postgres -d postgres --slot "$slot" --start -E "$END" --no-loop -f /dev/null \
    -o proto_version=2 -o publication_names=bench -o messages=true -o streaming=on "$@"
}
peek() { # binary: true|false
  "${PSQL[@]}" -c "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('peek', '$END', NULL, 'proto_version', '2', 'publication_names', 'bench', 'messages', 'true', 'streaming', 'on', 'binary', '$1')"
}
timed() { # var command...: sets var to the wall seconds of the command
  local __v=$1; shift
  local t0 t1; t0=$(now); "$@" >/dev/null; t1=$(now)
  printf -v "$__v" '%s' "$(secs "$t0" "$t1")"
}

SUMMARY=()   # rows of the headline table: | benchmark | figure | goal | status |
SECTIONS=""  # the detailed tables
section() { SECTIONS+=$'\n'"$1"$'\n'; }

# ---------------------------------------------------------------- e2e
# REPEAT rounds; each round runs every consumer once (each on its own slot),
# so slow phases of the machine hit all consumers alike. Tables give the
# median and the range; ratios are of medians.
declare -A T   # T[consumer]="secs secs ..."
add_t() { T[$1]="${T[$1]:-} $2"; }
med() { python3 -c "import statistics,sys; print(f'{statistics.median(map(float, sys.argv[1:])):.2f}')" ${T[$1]}; }
rng() { python3 -c "import sys; v=sorted(map(float, sys.argv[1:])); print(f'{v[0]:.2f}–{v[-1]:.2f}')" ${T[$1]}; }
maxrss() { local m=0 f; for f in "$WORK"/$1_*.rss; do m=$(( $(cat "$f") > m ? $(cat "$f") : m )); done; echo "$(( m / 1024 )) MB"; }
JSONL_SINK() { printf '[[sink]]\nname = "jsonl"\ntype = "jsonl"\npath = "%s"\n' "$WORK/out_$1.jsonl"; }
NULL_SINK=$'[[sink]]\nname = "null"\ntype = "null"'
if want e2e; then
  MSGS="$(peek false)"
  for r in $(seq "$REPEAT"); do
    log "e2e round $r/$REPEAT: server decode (peek), pg_recvlogical, pgferry"
    timed x peek false; add_t peek "$x"
    timed x peek true; add_t peekb "$x"
    timed x recv "recv_$r" 127.0.0.1; add_t recv "$x"
    timed x recv "recv_unix_$r" "$WORK"; add_t recvu "$x"
    timed x recv "recv_bin_$r" 127.0.0.1 -o binary=true; add_t recvb "$x"
    ferry "ferry_null_$r" "ferry_null_$r" "$NULL_SINK"; add_t null "$(fsecs "ferry_null_$r")"
    ferry "ferry_null_unix_$r" "ferry_null_unix_$r" "$NULL_SINK" "host=$WORK port=$PORT user=postgres dbname=postgres"; add_t nullu "$(fsecs "ferry_null_unix_$r")"
    ferry "ferry_jsonl_$r" "ferry_jsonl_$r" "$(JSONL_SINK "$r")"; add_t jsonl "$(fsecs "ferry_jsonl_$r")"
    LINES=$(wc -l <"$WORK/out_$r.jsonl")
    [ "$LINES" -ge "$CHANGES" ] || { echo "pgferry wrote $LINES lines, expected $CHANGES" >&2; exit 1; }
    # The binary-values experiment (src/decode/binary.rs): its JSONL must be
    # byte for byte the text mode's. (These checks compare runs of the same
    # build with each other. Since issue 15 every line carries
    # "schema_version" and each run starts with one op:"schema" line per
    # table, so the bytes differ from builds before it, identically in
    # every run; the line count check above allows the extra lines.)
    PGFERRY_EXPERIMENT_BINARY=1 ferry "ferry_null_bin_$r" "ferry_null_bin_$r" "$NULL_SINK"; add_t nullb "$(fsecs "ferry_null_bin_$r")"
    PGFERRY_EXPERIMENT_BINARY=1 ferry "ferry_jsonl_bin_$r" "ferry_jsonl_bin_$r" "$(JSONL_SINK "bin_$r")"; add_t jsonlb "$(fsecs "ferry_jsonl_bin_$r")"
    cmp -s "$WORK/out_$r.jsonl" "$WORK/out_bin_$r.jsonl" || { echo "binary mode wrote other JSON than text mode:" >&2; cmp "$WORK/out_$r.jsonl" "$WORK/out_bin_$r.jsonl" >&2 || true; exit 1; }
    rm -f "$WORK/out_bin_$r.jsonl"
    # One tokio worker thread instead of one per CPU (TOKIO_WORKER_THREADS,
    # read by tokio's runtime builder): fewer cross-thread wake-ups.
    UNIXURL="host=$WORK port=$PORT user=postgres dbname=postgres"
    TOKIO_WORKER_THREADS=1 ferry "ferry_null_unix1_$r" "ferry_null_unix1_$r" "$NULL_SINK" "$UNIXURL"; add_t nullu1 "$(fsecs "ferry_null_unix1_$r")"
    TOKIO_WORKER_THREADS=1 ferry "ferry_jsonl_unix1_$r" "ferry_jsonl_unix1_$r" "$(JSONL_SINK "u1_$r")" "$UNIXURL"; add_t jsonlu1 "$(fsecs "ferry_jsonl_unix1_$r")"
    TOKIO_WORKER_THREADS=1 ferry "ferry_jsonl_tcp1_$r" "ferry_jsonl_tcp1_$r" "$(JSONL_SINK "t1_$r")"; add_t jsonlt1 "$(fsecs "ferry_jsonl_tcp1_$r")"
    for f in "u1_$r" "t1_$r"; do
      cmp -s "$WORK/out_$r.jsonl" "$WORK/out_$f.jsonl" || { echo "out_$f.jsonl differs from out_$r.jsonl" >&2; exit 1; }
      rm -f "$WORK/out_$f.jsonl"
    done
    [ "$r" = 1 ] || rm -f "$WORK/out_$r.jsonl"
  done
  PEEK=$(med peek); RECV=$(med recv); JSONLS=$(med jsonl)
  row() { local m; m=$(med "$2"); echo "| $1 | $m | $(rng "$2") | $(rate "$CHANGES" "$m") | $(ratio "$RECV" "$m")× | $(ratio "$PEEK" "$m")× | $3 |"; }
  section "### End to end: $CHANGES row changes ($WAL of WAL), $REPEAT rounds

| consumer | seconds (median) | range | changes/s | vs pg_recvlogical | vs server decode | peak RSS (max) |
|---|---:|---:|---:|---:|---:|---:|
$(row "server-side decode (peek, no network; $MSGS messages)" peek –)
$(row "server-side decode, \`binary 'true'\`" peekb –)
$(row "pg_recvlogical → /dev/null (TCP loopback)" recv –)
$(row "pg_recvlogical → /dev/null (Unix socket)" recvu –)
$(row "pg_recvlogical → /dev/null, \`binary 'true'\`" recvb –)
$(row "pgferry → null sink (TCP loopback)" null "$(maxrss ferry_null)")
$(row "pgferry → null sink (Unix socket)" nullu "$(maxrss ferry_null_unix)")
$(row "pgferry → JSONL file" jsonl "$(maxrss ferry_jsonl)")
$(row "pgferry → JSONL file, one tokio worker (\`TOKIO_WORKER_THREADS=1\`)" jsonlt1 "$(maxrss ferry_jsonl_tcp1)")
$(row "pgferry → null sink, Unix socket, one tokio worker" nullu1 "$(maxrss ferry_null_unix1)")
$(row "pgferry → JSONL file, Unix socket, one tokio worker" jsonlu1 "$(maxrss ferry_jsonl_unix1)")
$(row "pgferry → null sink, binary values (experiment)" nullb "$(maxrss ferry_null_bin)")
$(row "pgferry → JSONL file, binary values (experiment; output identical, checked)" jsonlb "$(maxrss ferry_jsonl_bin)")"
  R1=$(ratio "$RECV" "$JSONLS"); R2=$(ratio "$PEEK" "$JSONLS")
  SUMMARY+=("| pgferry → JSONL vs pg_recvlogical (TCP) | ${R1}× ($(rate "$CHANGES" "$JSONLS") vs $(rate "$CHANGES" "$RECV") changes/s) | ≥ 2× | $(met "$R1" 2) |")
  SUMMARY+=("| pgferry → JSONL vs server-side decode | ${R2}× ($(rate "$CHANGES" "$PEEK") changes/s server-side) | ≥ 0.5× | $(met "$R2" 0.5) |")
  RSSMAX=$(cat "$WORK"/ferry_*.rss | sort -n | tail -1); RSSMAX=$((RSSMAX / 1024))
  SUMMARY+=("| peak RSS, e2e runs (largest) | $RSSMAX MB | < 50 MB | $(met_le "$RSSMAX" 50) |")
  SUMMARY+=("| \`binary 'true'\`: speed-up of pg_recvlogical / of the server decode | $(ratio "$RECV" "$(med recvb)")× / $(ratio "$PEEK" "$(med peekb)")× | (measure) | – |")
  SUMMARY+=("| binary values in pgferry (experiment): speed-up into null / into JSONL | $(ratio "$(med null)" "$(med nullb)")× / $(ratio "$JSONLS" "$(med jsonlb)")× | (measure; default only if faster and exact) | – |")
  SUMMARY+=("| pgferry → JSONL, Unix socket and one tokio worker, vs pg_recvlogical (TCP) / vs pg_recvlogical (Unix socket) | $(ratio "$RECV" "$(med jsonlu1)")× / $(ratio "$(med recvu)" "$(med jsonlu1)")× ($(rate "$CHANGES" "$(med jsonlu1)") changes/s) | (≥ 2× vs TCP) | $(met "$(ratio "$RECV" "$(med jsonlu1)")" 2) |")
  SUMMARY+=("| one tokio worker instead of two: pgferry → JSONL over TCP / over a Unix socket (null) | $(ratio "$JSONLS" "$(med jsonlt1)")× / $(ratio "$(med nullu)" "$(med nullu1)")× | (measure) | – |")
  SUMMARY+=("| Unix socket instead of TCP: pg_recvlogical / pgferry → null | $(ratio "$RECV" "$(med recvu)")× / $(ratio "$(med null)" "$(med nullu)")× | (measure) | – |")
fi

# ---------------------------------------------------------------- binary
# Exactness of the binary-values experiment on edge values (the e2e rounds
# check the bench table's 1M rows against the text mode).
if want binary; then
  log "binary: edge values against to_jsonb()"
  "${PSQL[@]}" -f benches/binary_fidelity.sql >/dev/null
  UNTIL_OVERRIDE="$("${PSQL[@]}" -c "SELECT pg_current_wal_insert_lsn()")"
  "${PSQL[@]}" -c "SET synchronous_commit = on; INSERT INTO marker VALUES (3)"
  PGFERRY_EXPERIMENT_BINARY=1 UNTIL_OVERRIDE=$UNTIL_OVERRIDE ferry bfid bfid "$(JSONL_SINK bfid)" "" '"public.bfid"' bfidpub
  "${PSQL[@]}" -c "SELECT to_jsonb(r) FROM bfid r ORDER BY id" >"$WORK/bfid.want"
  BFID=$(python3 benches/binary_fidelity.py "$WORK/out_bfid.jsonl" "$WORK/bfid.want" 2>"$WORK/bfid.diff") || true
  [ -s "$WORK/bfid.diff" ] && cat "$WORK/bfid.diff" >&2
  SUMMARY+=("| binary values (experiment) equal \`to_jsonb()\` on edge values of its types | $BFID | exact | $([ -s "$WORK/bfid.diff" ] && echo '**not met**' || echo met) |")
fi

# ---------------------------------------------------------------- tls
# pgferry over TLS (sslmode=verify-full, certificate and host name checked)
# against plain TCP, into null and into JSONL, REPEAT rounds interleaved on
# the same WAL. CPU of pgferry (user+sys, /usr/bin/time) and of the server
# process that sends the stream (the walsender, from /proc: TLS encrypts
# there), each run's own.
# wscpu SLOT OUT: waits for SLOT's walsender, then samples its CPU seconds
# (utime+stime) into OUT until it exits; with WSSEGS=1 also the data segments
# its own TCP socket sent (`ss`, per socket: data_segs_out) into OUT.segs.
wscpu() {
  local slot=$1 out=$2 pid="" tck; tck=$(getconf CLK_TCK)
  for _ in $(seq 600); do
    pid=$("${PSQL[@]}" -c "SELECT active_pid FROM pg_replication_slots WHERE slot_name = '$slot' AND active_pid IS NOT NULL")
    [ -n "$pid" ] && break; sleep 0.05
  done
  [ -n "$pid" ] || { echo "n/a" >"$out"; return; }
  local st ticks=0 segs=0 sg
  while st=$(cat "/proc/$pid/stat" 2>/dev/null); do
    ticks=$(echo "${st##*) }" | awk '{print $12 + $13}')   # fields 14, 15 after "(comm) "
    if [ -n "${WSSEGS:-}" ]; then
      sg=$(ss -tinpH "( sport = :$PORT )" 2>/dev/null | awk -v p="pid=$pid," '
        f { for (i = 1; i <= NF; i++) if ($i ~ /^data_segs_out:/) { split($i, a, ":"); print a[2] }; f = 0 }
        index($0, p) { f = 1 }' | head -1)
      [ -n "$sg" ] && segs=$sg
    fi
    sleep 0.1
  done
  python3 -c "print(f'{$ticks / $tck:.2f}')" >"$out"
  [ -z "${WSSEGS:-}" ] || echo "$segs" >"$out.segs"
}
tferry() { # name url sink: ferry with the walsender's CPU in $WORK/NAME.wscpu
  wscpu "$1" "$WORK/$1.wscpu" & local w=$!
  ferry "$1" "$1" "$3" "$2"
  wait "$w"
}
if want tls; then
  declare -A C W   # C[consumer]="cpu cpu ..." (pgferry), W[...] (walsender)
  add_c() { C[$1]="${C[$1]:-} $(cat "$WORK/$2.cpu")"; W[$1]="${W[$1]:-} $(cat "$WORK/$2.wscpu")"; }
  cmed() { python3 -c "import statistics,sys; print(f'{statistics.median(map(float, sys.argv[1:])):.2f}')" $1; }
  for r in $(seq "$REPEAT"); do
    log "tls round $r/$REPEAT: pgferry plain and over TLS (verify-full), null and JSONL"
    tferry "tls_null_plain_$r" "$PLAIN_URL" "$NULL_SINK"; add_t tnullp "$(fsecs "tls_null_plain_$r")"; add_c tnullp "tls_null_plain_$r"
    if [ "$r" = 1 ]; then # what the TLS session is: the walsender's row of pg_stat_ssl, while it runs
      (for _ in $(seq 200); do
        v=$("${PSQL[@]}" -c "SELECT version || ' ' || cipher FROM pg_stat_ssl s JOIN pg_replication_slots p ON p.active_pid = s.pid WHERE p.slot_name = 'tls_null_1' AND s.ssl")
        [ -n "$v" ] && { echo "$v" >"$WORK/tls_session"; break; }; sleep 0.05
      done) &
      SESS_PID=$!
    fi
    tferry "tls_null_$r" "$TLS_URL" "$NULL_SINK"; add_t tnull "$(fsecs "tls_null_$r")"; add_c tnull "tls_null_$r"
    [ "$r" = 1 ] && wait "$SESS_PID"
    tferry "tls_jsonl_plain_$r" "$PLAIN_URL" "$(JSONL_SINK "tlsp_$r")"; add_t tjsonlp "$(fsecs "tls_jsonl_plain_$r")"; add_c tjsonlp "tls_jsonl_plain_$r"
    tferry "tls_jsonl_$r" "$TLS_URL" "$(JSONL_SINK "tls_$r")"; add_t tjsonl "$(fsecs "tls_jsonl_$r")"; add_c tjsonl "tls_jsonl_$r"
    LINES=$(wc -l <"$WORK/out_tls_$r.jsonl")
    [ "$LINES" -ge "$CHANGES" ] || { echo "pgferry over TLS wrote $LINES lines, expected $CHANGES" >&2; exit 1; }
    cmp -s "$WORK/out_tlsp_$r.jsonl" "$WORK/out_tls_$r.jsonl" || { echo "pgferry over TLS wrote other JSON than over plain TCP" >&2; exit 1; }
    rm -f "$WORK/out_tlsp_$r.jsonl" "$WORK/out_tls_$r.jsonl"
  done
  SESSION=$(cat "$WORK/tls_session" 2>/dev/null || echo "unknown")
  [ "$SESSION" != unknown ] || { echo "the TLS runs' walsender had no TLS session in pg_stat_ssl" >&2; exit 1; }
  trow() { local m; m=$(med "$2"); echo "| $1 | $m | $(rng "$2") | $(rate "$CHANGES" "$m") | $(cmed "${C[$2]}") | $(cmed "${W[$2]}") |"; }
  section "### TLS: $CHANGES row changes, pgferry over TCP loopback, plain and TLS (\`sslmode=verify-full\`; $SESSION, EC P-256 certificate), $REPEAT rounds

CPU is the median of each run's own: pgferry's user+sys (\`/usr/bin/time\`),
and that of the server's walsender process for the run's slot (from
\`/proc/PID/stat\`, sampled every 0.1 s until it exits). The JSONL written
over TLS is checked identical to the plain run's.

| consumer | seconds (median) | range | changes/s | pgferry CPU s (user+sys) | walsender CPU s |
|---|---:|---:|---:|---:|---:|
$(trow "pgferry → null sink, plain TCP" tnullp)
$(trow "pgferry → null sink, TLS" tnull)
$(trow "pgferry → JSONL file, plain TCP" tjsonlp)
$(trow "pgferry → JSONL file, TLS" tjsonl)"
  tcost() { # plain tls: time, pgferry CPU, walsender CPU ratios tls/plain
    echo "$(ratio "$(med "$2")" "$(med "$1")")× / $(ratio "$(cmed "${C[$2]}")" "$(cmed "${C[$1]}")")× / $(ratio "$(cmed "${W[$2]}")" "$(cmed "${W[$1]}")")×"
  }
  SUMMARY+=("| TLS (verify-full) vs plain TCP, into null: time / pgferry CPU / walsender CPU | $(tcost tnullp tnull) | (measure) | – |")
  SUMMARY+=("| TLS (verify-full) vs plain TCP, into JSONL: time / pgferry CPU / walsender CPU | $(tcost tjsonlp tjsonl) | (measure) | – |")
fi

# ---------------------------------------------------------------- cpu
# Issue 14: what each consumer of the same WAL costs on both sides of the
# socket, quiet and under a fixed load of the script's own (a busy loop
# pinned to CPU 1). Per run: wall time; its own CPU (user+sys, /usr/bin/time);
# the CPU of the walsender serving it (/proc/PID/stat) and the data segments
# that walsender's socket sent (`ss -ti` of that one socket, so other traffic
# on the machine does not count); pgferry's read calls (its "session
# statistics" log line); peak RSS. Consumers alternate within each round.
if want cpu; then
  declare -A CT CC CW CS CR CM CLOAD   # per "mode consumer": secs, own CPU, walsender CPU, segments, reads, RSS (KiB)
  cadd() { local k="$1 $2"; CT[$k]="${CT[$k]:-} $3"; CC[$k]="${CC[$k]:-} $4"; CW[$k]="${CW[$k]:-} $5"; CS[$k]="${CS[$k]:-} $6"; CR[$k]="${CR[$k]:-} $7"; CM[$k]="${CM[$k]:-} $8"; }
  cmedian() { python3 -c "import statistics,sys; v=[float(x) for x in sys.argv[1:] if x != 'n/a']; print(f'{statistics.median(v):.2f}' if v else 'n/a')" $1; }
  crange() { python3 -c "import sys; v=sorted(float(x) for x in sys.argv[1:]); print(f'{v[0]:.2f}–{v[-1]:.2f}')" $1; }
  cmax() { python3 -c "import sys; print(max(int(x) for x in sys.argv[1:]) // 1024)" $1; }
  creads() { python3 -c "
import json, sys
for l in open(sys.argv[1]):
    try: j = json.loads(l)
    except ValueError: continue
    f = j.get('fields', j)
    if 'reads' in f: print(f['reads']); break
else: print('n/a')" "$1"; }
  cpu_one() { # mode round consumer
    local m=$1 r=$2 c=$3 name="cpu_$1_$3_$2"
    if [ "$c" = recv ]; then
      WSSEGS=1 wscpu "$name" "$WORK/$name.wscpu" & local w=$!
      local t0; t0=$(now)
      /usr/bin/time -f "%M %U %S" -o "$WORK/$name.time" "$PGBIN/pg_recvlogical" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres --slot "$name" \
        --start -E "$END" --no-loop -f /dev/null -o proto_version=2 -o publication_names=bench -o messages=true -o streaming=on
      secs "$t0" "$(now)" >"$WORK/$name.secs"
      wait "$w"
      local rss usr sys; read -r rss usr sys <"$WORK/$name.time"
      echo "$rss" >"$WORK/$name.rss"; python3 -c "print(f'{$usr + $sys:.2f}')" >"$WORK/$name.cpu"
      echo n/a >"$WORK/$name.reads"
    else
      local tag=${c%_*} kind=${c##*_} bin=$BIN sink
      [ "$tag" = before ] && bin=$BIN_BEFORE
      local src="CPU_SRC_$tag" cfg="CPU_CFG_$tag"
      if [ "$kind" = jsonl ]; then sink=$(JSONL_SINK "$name"); else sink=$NULL_SINK; fi
      FERRY_BIN=$bin FERRY_SOURCE_EXTRA="${FERRY_SOURCE_EXTRA:-}"$'\n'"${!src:-}" FERRY_EXTRA="${!cfg:-}" WSSEGS=1 tferry "$name" "$PLAIN_URL" "$sink"
      creads "$WORK/$name.log" >"$WORK/$name.reads"
    fi
    cadd "$m" "$c" "$(cat "$WORK/$name.secs")" "$(cat "$WORK/$name.cpu")" "$(cat "$WORK/$name.wscpu")" \
      "$(cat "$WORK/$name.wscpu.segs" 2>/dev/null || echo n/a)" "$(cat "$WORK/$name.reads")" "$(cat "$WORK/$name.rss")"
  }
  for m in quiet load; do
    LOADPID=""
    if [ "$m" = load ]; then
      taskset -c 1 sh -c 'while :; do :; done' & LOADPID=$!; PIDS+=("$LOADPID")
    fi
    CLOAD[$m]=""
    for r in $(seq "$REPEAT"); do
      CLOAD[$m]+=" $(cut -d' ' -f1 /proc/loadavg)"
      log "cpu ($m) round $r/$REPEAT: $CPU_CONSUMERS (load average $(cut -d' ' -f1-3 /proc/loadavg))"
      REF=""
      for c in $CPU_CONSUMERS; do
        cpu_one "$m" "$r" "$c"
        f="$WORK/out_cpu_${m}_${c}_$r.jsonl"
        [ -f "$f" ] || continue
        LINES=$(wc -l <"$f")
        [ "$LINES" -ge "$CHANGES" ] || { echo "pgferry ($c) wrote $LINES lines, expected $CHANGES" >&2; exit 1; }
        # Byte for byte the same JSONL from every build and setting (and as the e2e part's).
        for g in "$REF" "$WORK/out_1.jsonl"; do
          [ -n "$g" ] && [ -f "$g" ] || continue
          cmp -s "$g" "$f" || { echo "$f differs from $g" >&2; exit 1; }
        done
        if [ -z "$REF" ]; then REF=$f; else rm -f "$f"; fi
      done
      rm -f "$REF"
    done
    [ -z "$LOADPID" ] || kill "$LOADPID" 2>/dev/null || true
  done
  crow() { # mode consumer label
    local k="$1 $2" segs reads
    segs=$(cmedian "${CS[$k]}"); reads=$(cmedian "${CR[$k]}")
    local per; per=$(python3 -c "print('n/a' if '$segs' == 'n/a' or float('$segs') == 0 else f'{$CHANGES / float(\"$segs\"):.1f}')")
    echo "| $3 | $(cmedian "${CT[$k]}") | $(crange "${CT[$k]}") | $(cmedian "${CC[$k]}") | $(cmedian "${CW[$k]}") | ${segs%.00} | $per | ${reads%.00} | $(cmax "${CM[$k]}") MB |"
  }
  clabel() {
    case $1 in
      recv) echo "pg_recvlogical → /dev/null" ;;
      before_*) echo "pgferry before (\`$BIN_BEFORE\`) → ${1#before_}" ;;
      after_*) echo "pgferry → ${1#after_}" ;;
      *) local cfg="CPU_CFG_${1%_*}" src="CPU_SRC_${1%_*}"; echo "pgferry → ${1##*_}, $(echo "${!src:-} ${!cfg:-}" | tr '\n' ' ' | sed 's/  */ /g; s/^ //; s/ $//')" ;;
    esac
  }
  for m in quiet load; do
    what="quiet (no load of its own)"; [ "$m" = load ] && what="under a busy loop pinned to CPU 1"
    rows=""; for c in $CPU_CONSUMERS; do rows+="$(crow "$m" "$c" "$(clabel "$c")")"$'\n'; done
    section "### CPU per change, $what: $CHANGES row changes over TCP loopback, $REPEAT rounds (load average at the rounds' starts:${CLOAD[$m]})

Medians (time range in its column). Own CPU is the consumer's user+sys; walsender CPU that of the server process serving it; segments are the data segments that walsender's socket sent (\`ss -ti\`: data_segs_out, that socket only).

| consumer | seconds | range | own CPU s | walsender CPU s | segments | changes per segment | reads | peak RSS |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
${rows%$'\n'}"
    k() { echo "$m $1"; }
    RT=$(cmedian "${CT[$(k recv)]}"); RC=$(cmedian "${CC[$(k recv)]}"); RW=$(cmedian "${CW[$(k recv)]}")
    for c in after_jsonl w1_jsonl before_jsonl; do
      [[ " $CPU_CONSUMERS " == *" $c "* ]] || continue
      FT=$(cmedian "${CT[$(k "$c")]}"); FC=$(cmedian "${CC[$(k "$c")]}"); FW=$(cmedian "${CW[$(k "$c")]}")
      case $c in after_jsonl) lbl="pgferry → JSONL" ;; w1_jsonl) lbl="pgferry → JSONL, one thread" ;; *) lbl="pgferry before → JSONL" ;; esac
      SUMMARY+=("| $m: $lbl own CPU vs pg_recvlogical's | $(ratio "$FC" "$RC")× ($FC s vs $RC s) | ≤ 1.5× | $(met_le "$(ratio "$FC" "$RC")" 1.5) |")
      SUMMARY+=("| $m: walsender CPU serving $lbl vs serving pg_recvlogical | $(ratio "$FW" "$RW")× ($FW s vs $RW s) | ≤ 0.8× | $(met_le "$(ratio "$FW" "$RW")" 0.8) |")
      SUMMARY+=("| $m: $lbl end to end vs pg_recvlogical | $(ratio "$RT" "$FT")× ($FT s vs $RT s) | ≥ 1.5× | $(met "$(ratio "$RT" "$FT")" 1.5) |")
    done
  done
fi

# ---------------------------------------------------------------- redis
if want redis || want latency; then
  REDIS_PORT="$(free_port)"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" --logfile "$WORK/redis.log" --daemonize no &
  PIDS+=($!)
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
redis_sink() { # db mode [table key]
  local table=${3:-public.items} key=${4:-}
  [ -n "$key" ] || key='item:{id}'
  printf '[[sink]]\nname = "redis"\ntype = "redis"\nurl = "redis://127.0.0.1:%s/%s"\n[sink.tables."%s"]\nkey = "%s"\nmode = "%s"\n' \
    "$REDIS_PORT" "$1" "$table" "$key" "$2"
}
if want redis; then
  for r in $(seq "$REPEAT"); do
    log "redis round $r/$REPEAT: json and hash modes"
    if ! want e2e; then ferry "ferry_jsonl_$r" "ferry_jsonl_$r" "$(JSONL_SINK "$r")"; add_t jsonl "$(fsecs "ferry_jsonl_$r")"; fi
    redis-cli -p "$REDIS_PORT" flushall >/dev/null
    ferry "redis_json_$r" "redis_json_$r" "$(redis_sink 0 json)"; add_t rjson "$(fsecs "redis_json_$r")"
    ferry "redis_hash_$r" "redis_hash_$r" "$(redis_sink 1 hash)"; add_t rhash "$(fsecs "redis_hash_$r")"
    for db in 0 1; do
      keys=$(redis-cli -p "$REDIS_PORT" -n $db --scan --pattern 'item:*' | wc -l)
      [ "$keys" = "$LIVE" ] || { echo "redis db $db holds $keys item keys, expected $LIVE" >&2; exit 1; }
    done
  done
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
  JSONLS=$(med jsonl); RJ=$(med rjson); RH=$(med rhash)
  rrow() { local m; m=$(med "$2"); echo "| $1 | $m | $(rng "$2") | $(rate "$CHANGES" "$m") | $(ratio "$JSONLS" "$m")× | $3 |"; }
  section "### Redis: the same $CHANGES changes ($LIVE keys at the end, verified), $REPEAT rounds

| sink | seconds (median) | range | changes/s | vs pgferry → JSONL | peak RSS (max) |
|---|---:|---:|---:|---:|---:|
$(rrow "JSONL file (reference, from the e2e rounds)" jsonl "$(maxrss ferry_jsonl)")
$(rrow "Redis, json mode" rjson "$(maxrss redis_json)")
$(rrow "Redis, hash mode" rhash "$(maxrss redis_hash)")"
  SUMMARY+=("| Redis json vs pgferry → JSONL | $(ratio "$JSONLS" "$RJ")× ($(rate "$CHANGES" "$RJ") changes/s) | ≥ 0.8× | $(met "$(ratio "$JSONLS" "$RJ")" 0.8) |")
  SUMMARY+=("| Redis hash vs pgferry → JSONL | $(ratio "$JSONLS" "$RH")× ($(rate "$CHANGES" "$RH") changes/s) | ≥ 0.8× | $(met "$(ratio "$JSONLS" "$RH")" 0.8) |")
fi

# ---------------------------------------------------------------- nats
# One stream per round (its own subjects): each round's pgferry has its own
# slot, so its position must not be read from another round's messages.
if want nats; then
  ensure_packages nats-server
  NATS_PORT="$(free_port)"; NATS_MON="$(free_port)"
  nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MON" -sd "$WORK/nats" --server_name bench >"$WORK/nats.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do grep -q "Server is ready" "$WORK/nats.log" && break; sleep 0.1; done
  nats_msgs() { # stream: its message count, from the monitoring endpoint
    curl -fsS "http://127.0.0.1:$NATS_MON/jsz?streams=true" | python3 -c "
import json, sys
j = json.load(sys.stdin)
print(sum(s['state']['messages'] for a in j.get('account_details', []) for s in a.get('stream_detail', []) if s['name'] == '$1'))"
  }
  for r in $(seq "$REPEAT"); do
    log "nats round $r/$REPEAT"
    if ! want e2e && ! want redis; then ferry "ferry_jsonl_$r" "ferry_jsonl_$r" "$(JSONL_SINK "$r")"; add_t jsonl "$(fsecs "ferry_jsonl_$r")"; fi
    ferry "nats_$r" "nats_$r" "$(printf '[[sink]]\nname = "nats"\ntype = "nats"\nurl = "nats://127.0.0.1:%s"\nstream = "BENCH%s"\nsubject = "bench%s.{schema}.{table}"\n' "$NATS_PORT" "$r" "$r")"
    add_t nats "$(fsecs "nats_$r")"
    got=$(nats_msgs "BENCH$r")
    [ "$got" = "$CHANGES" ] || { echo "stream BENCH$r holds $got messages, expected $CHANGES" >&2; exit 1; }
  done
  JSONLS=$(med jsonl); NS=$(med nats)
  ncpu() { python3 -c "import statistics,sys; print(f'{statistics.median(map(float, sys.argv[1:])):.2f}')" $(cat "$WORK"/$1_*.cpu); }
  nrow() { local m; m=$(med "$2"); echo "| $1 | $m | $(rng "$2") | $(ncpu "$3") | $(rate "$CHANGES" "$m") | $(ratio "$JSONLS" "$m")× | $(maxrss "$3") |"; }
  section "### NATS JetStream: the same $CHANGES changes ($CHANGES messages in each stream, verified), $REPEAT rounds

| sink | seconds (median) | range | pgferry CPU s (user+sys, median) | changes/s | vs pgferry → JSONL | peak RSS (max) |
|---|---:|---:|---:|---:|---:|---:|
$(nrow "JSONL file (reference)" jsonl ferry_jsonl)
$(nrow "NATS JetStream (file store, acks awaited, max_in_flight 1024)" nats nats)"
  SUMMARY+=("| NATS JetStream vs pgferry → JSONL | $(ratio "$JSONLS" "$NS")× ($(rate "$CHANGES" "$NS") changes/s, peak RSS $(maxrss nats)) | ≥ 0.8× | $(met "$(ratio "$JSONLS" "$NS")" 0.8) |")
fi

# ---------------------------------------------------------------- search
if want search; then
  log "search: OpenSearch node, pgferry vs direct _bulk"
  command -v java >/dev/null 2>&1 || ensure_packages openjdk-17-jdk-headless
  command -v mvn >/dev/null 2>&1 || ensure_packages maven
  [ -f tests/opensearch/target/cp.txt ] || tests/opensearch/build.sh
  OS_PORT="$(free_port)"
  OS_PID=$(OPENSEARCH_JAVA_OPTS="${OPENSEARCH_JAVA_OPTS:--Xms1g -Xmx1g}" tests/opensearch/start.sh "$WORK/os-home" "$OS_PORT")
  PIDS+=("$OS_PID")
  [ -f "$WORK/out_1.jsonl" ] || ferry ferry_jsonl_1 ferry_jsonl_1 "$(JSONL_SINK 1)"
  # Warm the JVM up (JIT, index creation paths) on a throwaway index first,
  # so neither measured load pays for it; then the direct load, then pgferry.
  "$PY" benches/bulk_direct.py "$WORK/out_1.jsonl" "http://127.0.0.1:$OS_PORT" warmup 1000 "${SEARCH_WARMUP_OPS:-100000}" >/dev/null
  curl -s -XDELETE "http://127.0.0.1:$OS_PORT/warmup" >/dev/null
  DIRECT=$("$PY" benches/bulk_direct.py "$WORK/out_1.jsonl" "http://127.0.0.1:$OS_PORT" direct_items 1000)
  ferry search search "$(printf '[[sink]]\nname = "search"\ntype = "opensearch"\nurl = "http://127.0.0.1:%s"\n[sink.tables."public.items"]\nindex = "ferry_items"\n' "$OS_PORT")"
  SF=$(fsecs search)
  DS=$(echo "$DIRECT" | cut -d' ' -f1); DOPS=$(echo "$DIRECT" | cut -d' ' -f2); DREQ=$(echo "$DIRECT" | cut -d' ' -f3)
  curl -s -XPOST "http://127.0.0.1:$OS_PORT/_refresh" >/dev/null
  NF=$(curl -s "http://127.0.0.1:$OS_PORT/ferry_items/_count" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])')
  ND=$(curl -s "http://127.0.0.1:$OS_PORT/direct_items/_count" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])')
  [ "$NF" = "$LIVE" ] && [ "$ND" = "$LIVE" ] || { echo "documents: pgferry $NF, direct $ND, expected $LIVE" >&2; exit 1; }
  section "### OpenSearch 2.19.6 (single node, 1 GiB heap): $((CHANGES - 1)) changes of \`items\` ($LIVE documents at the end, verified in both indices)

| loader | seconds | changes/s | vs direct \`_bulk\` | peak RSS |
|---|---:|---:|---:|---:|
| direct \`_bulk\` (Python, one keep-alive connection, $DREQ requests of ≤ 1000 operations, same external versions; body built before timing) | $DS | $(rate "$DOPS" "$DS") | 1.00× | – |
| pgferry → opensearch sink (whole process, from the slot) | $SF | $(rate "$((CHANGES - 1))" "$SF") | $(ratio "$DS" "$SF")× | $(frss search) |"
  SUMMARY+=("| OpenSearch sink vs direct \`_bulk\` | $(ratio "$DS" "$SF")× ($(rate "$((CHANGES - 1))" "$SF") changes/s) | ≥ 0.8× | $(met "$(ratio "$DS" "$SF")" 0.8) |")
  kill "$OS_PID" 2>/dev/null || true
fi

# ---------------------------------------------------------------- latency
if want latency; then
  log "latency: $LAT_TPS transactions/s for $LAT_SECS s, commit -> visible in Redis"
  "${PSQL[@]}" >/dev/null <<SQL
CREATE TABLE lat (id int PRIMARY KEY, seq bigint, sent_at timestamptz);
INSERT INTO lat SELECT g, 0, now() FROM generate_series(1, 1000) g;
CREATE PUBLICATION latpub FOR TABLE lat;
SELECT count(pg_create_logical_replication_slot('lat', 'pgoutput'));
SQL
  cat >"$WORK/lat.toml" <<TOML
[source]
url = "$PLAIN_URL"
slot = "lat"
publication = "latpub"
tables = ["public.lat"]
${FERRY_SOURCE_EXTRA:-}
[checkpoint]
dir = "$WORK/state-lat"
$(redis_sink 2 json public.lat 'lat:{id}')
${FERRY_EXTRA:-}
TOML
  "$BIN" --log-format json run --config "$WORK/lat.toml" 2>"$WORK/lat.log" &
  LAT_PID=$!; PIDS+=("$LAT_PID")
  LATOUT=$("$PY" benches/latency.py "host=127.0.0.1 port=$PORT user=postgres dbname=postgres" "$REDIS_PORT" 2 "$LAT_TPS" "$LAT_SECS")
  kill "$LAT_PID" 2>/dev/null || true; wait "$LAT_PID" 2>/dev/null || true
  read -r LN LP50 LP99 LMAX SP50 SP99 SMAX LRATE LNEG <<<"$LATOUT"
  section "### Latency: commit → visible in Redis (json mode), $LN transactions at $LRATE/s

Each transaction (autocommit) updates one of 1,000 rows, with
\`synchronous_commit = on\` in the driver's session; default pipeline settings.
Latency is (Redis keyspace notification received) − (COMMIT's reply
received by the Python driver), both on CLOCK_MONOTONIC, in two processes;
$LNEG of $LN samples were negative (the change reached Redis before the
driver had parsed the reply). Measured from *sending* the statement instead,
an upper bound, it is in the second row.

| measured from | p50 | p99 | max |
|---|---:|---:|---:|
| COMMIT's reply | $LP50 ms | $LP99 ms | $LMAX ms |
| sending the UPDATE | $SP50 ms | $SP99 ms | $SMAX ms |"
  SUMMARY+=("| latency commit → Redis at $LRATE txn/s, p50 / p99 / max | $LP50 / $LP99 / $LMAX ms | p99 < 10 ms | $(met_le "$LP99" 10) |")
fi

# ---------------------------------------------------------------- kafka
if want kafka; then
  log "kafka: embedded broker, pgferry with exactly_once false and true"
  command -v java >/dev/null 2>&1 || ensure_packages openjdk-17-jdk-headless
  command -v mvn >/dev/null 2>&1 || ensure_packages maven
  KAFKA_PORT="$(free_port)"
  KAFKA_PID=$(KAFKA_JAVA_OPTS="${KAFKA_JAVA_OPTS:--Xms512m -Xmx1g}" tests/kafka/start.sh "$WORK/kafka-home" "$KAFKA_PORT")
  PIDS+=("$KAFKA_PID")
  kafka_sink() { # name exactly_once
    printf '[[sink]]\nname = "%s"\ntype = "kafka"\nbrokers = "127.0.0.1:%s"\ntopic = "%s.{schema}.{table}"\nexactly_once = %s\n[sink.kafka]\n"linger.ms" = %s\n' \
      "$1" "$KAFKA_PORT" "$1" "$2" "${KAFKA_LINGER_MS:-5}"
  }
  for r in $(seq "$REPEAT"); do
    log "kafka round $r/$REPEAT"
    if ! want e2e && ! want redis; then ferry "ferry_jsonl_$r" "ferry_jsonl_$r" "$(JSONL_SINK "$r")"; add_t jsonl "$(fsecs "ferry_jsonl_$r")"; fi
    for mode in alo eo; do
      eo=false; [ "$mode" = eo ] && eo=true
      ferry "kafka_${mode}_$r" "kafka_${mode}_$r" "$(kafka_sink "k${mode}$r" "$eo")"; add_t "k$mode" "$(fsecs "kafka_${mode}_$r")"
      read -r KV KT <<<"$("$PY" benches/kafka_bench.py count "127.0.0.1:$KAFKA_PORT" "k${mode}$r")"
      [ "$KV" = "$CHANGES" ] || { echo "kafka ($mode): $KV records, expected $CHANGES" >&2; exit 1; }
    done
  done
  JSONLS=$(med jsonl); KA=$(med kalo); KE=$(med keo)
  kcpu() { python3 -c "import statistics,sys; print(f'{statistics.median(map(float, sys.argv[1:])):.1f}')" $(cat "$WORK"/$1_*.cpu); }
  krow() { local m; m=$(med "$2"); echo "| $1 | $m | $(rng "$2") | $(rate "$CHANGES" "$m") | $(ratio "$JSONLS" "$m")× | $(kcpu "$3") s | $(maxrss "$3") |"; }
  log "kafka latency: $KAFKA_LAT_TPS txn/s for $LAT_SECS s"
  "${PSQL[@]}" >/dev/null <<SQL
CREATE TABLE klat (id int PRIMARY KEY, seq bigint);
INSERT INTO klat SELECT g, 0 FROM generate_series(1, 1000) g;
CREATE PUBLICATION klatpub FOR TABLE klat;
SELECT count(pg_create_logical_replication_slot('klat', 'pgoutput'));
SQL
  cat >"$WORK/klat.toml" <<TOML
[source]
url = "$PLAIN_URL"
slot = "klat"
publication = "klatpub"
tables = ["public.klat"]
[checkpoint]
dir = "$WORK/state-klat"
$(kafka_sink klat "${KAFKA_LAT_EXACTLY_ONCE:-true}")
TOML
  "$BIN" --log-format json run --config "$WORK/klat.toml" 2>"$WORK/klat.log" &
  KLAT_PID=$!; PIDS+=("$KLAT_PID")
  # The topic exists once the first change went through.
  "${PSQL[@]}" -c "UPDATE klat SET seq = 0 WHERE id = 1"
  for _ in $(seq 120); do
    [ "$("$PY" benches/kafka_bench.py count "127.0.0.1:$KAFKA_PORT" klat | cut -d' ' -f1)" -ge 1 ] 2>/dev/null && break; sleep 1
  done
  KLATOUT=$("$PY" benches/kafka_bench.py latency "host=127.0.0.1 port=$PORT user=postgres dbname=postgres" "127.0.0.1:$KAFKA_PORT" klat.public.klat "$KAFKA_LAT_TPS" "$LAT_SECS")
  kill "$KLAT_PID" 2>/dev/null || true; wait "$KLAT_PID" 2>/dev/null || true
  read -r KN KP50 KP99 KMAX KSP50 KSP99 KSMAX KRATE KNEG <<<"$KLATOUT"
  section "### Kafka (embedded Apache Kafka 4.4.0, one KRaft node, 3 partitions, linger.ms = ${KAFKA_LINGER_MS:-5}): the same $CHANGES changes, $REPEAT rounds, records counted with a read_committed consumer

| sink | seconds (median) | range | changes/s | vs pgferry → JSONL | pgferry CPU (user+sys, median) | peak RSS (max) |
|---|---:|---:|---:|---:|---:|---:|
$(krow "JSONL file (reference)" jsonl ferry_jsonl)
$(krow "Kafka, exactly_once = false (idempotent producer)" kalo kafka_alo)
$(krow "Kafka, exactly_once = true (one transaction per batch)" keo kafka_eo)

Latency commit → visible to a \`read_committed\` consumer (Python, confluent-kafka), $KN transactions at $KRATE/s, exactly_once = ${KAFKA_LAT_EXACTLY_ONCE:-true}; $KNEG negative samples:

| measured from | p50 | p99 | max |
|---|---:|---:|---:|
| COMMIT's reply | $KP50 ms | $KP99 ms | $KMAX ms |
| sending the UPDATE | $KSP50 ms | $KSP99 ms | $KSMAX ms |"
  SUMMARY+=("| Kafka exactly_once = false vs pgferry → JSONL | $(ratio "$JSONLS" "$KA")× ($(rate "$CHANGES" "$KA") changes/s) | ≥ 0.8× | $(met "$(ratio "$JSONLS" "$KA")" 0.8) |")
  SUMMARY+=("| Kafka exactly_once = true vs pgferry → JSONL | $(ratio "$JSONLS" "$KE")× ($(rate "$CHANGES" "$KE") changes/s) | ≥ 0.5× | $(met "$(ratio "$JSONLS" "$KE")" 0.5) |")
  SUMMARY+=("| latency commit → Kafka read_committed consumer at $KRATE txn/s, p50 / p99 / max | $KP50 / $KP99 / $KMAX ms | p99 < 50 ms | $(met_le "$KP99" 50) |")
  kill "$KAFKA_PID" 2>/dev/null || true
fi

# ---------------------------------------------------------------- memory
if want memory; then
  log "memory: one transaction of $BIG_TXN_ROWS rows"
  "${PSQL[@]}" >/dev/null <<SQL
CREATE TABLE bigtx (id bigint PRIMARY KEY, sku text, name text, price numeric(10,2), stock int, tags text[], attrs jsonb, updated_at timestamptz);
CREATE PUBLICATION bigpub FOR TABLE bigtx;
SELECT count(pg_create_logical_replication_slot('bigtx', 'pgoutput'));
INSERT INTO bigtx SELECT g, 'SKU-' || g, 'item number ' || g, (g % 10000) / 100.0, g % 500,
  ARRAY['tag' || (g % 10), 'x'], jsonb_build_object('color', 'c' || (g % 7), 'size', g % 40), now()
FROM generate_series(1, $BIG_TXN_ROWS) g;
SQL
  UNTIL_OVERRIDE="$("${PSQL[@]}" -c "SELECT pg_current_wal_insert_lsn()")"
  "${PSQL[@]}" -c "SET synchronous_commit = on; INSERT INTO marker VALUES (2)"
  UNTIL_OVERRIDE=$UNTIL_OVERRIDE ferry bigtx bigtx $'[[sink]]\nname = "null"\ntype = "null"' "" '"public.bigtx"' bigpub
  BT=$(fsecs bigtx); BRSS=$(( $(cat "$WORK/bigtx.rss") / 1024 ))
  section "### Memory: one transaction of $BIG_TXN_ROWS rows into the null sink (default \`memory_limit_mb = 16\`, spilled)

| seconds | changes/s | peak RSS |
|---:|---:|---:|
| $BT | $(rate "$BIG_TXN_ROWS" "$BT") | $BRSS MB |"
  SUMMARY+=("| peak RSS, one transaction of $BIG_TXN_ROWS rows | $BRSS MB | < 100 MB | $(met_le "$BRSS" 100) |")
fi

# ---------------------------------------------------------------- snapshot
if want snapshot; then
  "${PSQL[@]}" <<SQL
CREATE TABLE snap (id bigint PRIMARY KEY, sku text, name text, price numeric(10,2), stock int, tags text[], attrs jsonb, updated_at timestamptz);
INSERT INTO snap SELECT g, 'SKU-' || g, 'item number ' || g, (g % 10000) / 100.0, g % 500,
  ARRAY['tag' || (g % 10), 'x'], jsonb_build_object('color', 'c' || (g % 7), 'size', g % 40), now()
FROM generate_series(1, $SNAP_ROWS) g;
CREATE PUBLICATION snappub FOR TABLE snap;
SQL
  timed COPYS "${PSQL[@]}" -c "COPY snap TO STDOUT"
  if "$BIN" run --help | grep -q exit-after-snapshot; then
    snap() { # name sink-toml
      cat >"$WORK/$1.toml" <<TOML
[source]
url = "$PLAIN_URL"
slot = "$1"
publication = "snappub"
tables = ["public.snap"]
snapshot = "initial"
[checkpoint]
dir = "$WORK/state-$1"
$2
${SNAPSHOT_EXTRA:-}
TOML
      local t0; t0=$(now)
      /usr/bin/time -f "%M" -o "$WORK/$1.rss" "$BIN" --log-format json run --config "$WORK/$1.toml" --exit-after-snapshot 2>"$WORK/$1.log" \
        || { echo "pgferry ($1) failed:" >&2; tail -5 "$WORK/$1.log" >&2; return 1; }
      secs "$t0" "$(now)" >"$WORK/$1.secs"
    }
    log "snapshot: $SNAP_ROWS rows into null"
    snap snap_null "$NULL_SINK"
    log "snapshot: $SNAP_ROWS rows into JSONL"
    snap snap_jsonl "$(JSONL_SINK snap)"
    SL=$(grep -c '"op":"read"' "$WORK/out_snap.jsonl" || true)
    [ "$SL" = "$SNAP_ROWS" ] || { echo "snapshot wrote $SL read events, expected $SNAP_ROWS" >&2; exit 1; }
    srow() { local t; t=$(fsecs "$1"); echo "| $2 | $t | $(rate "$SNAP_ROWS" "$t") | $(ratio "$COPYS" "$t")× | $(frss "$1") |"; }
    SROWS="$(srow snap_null "pgferry \`snapshot = \"initial\"\` → null sink, \`--exit-after-snapshot\`")
$(srow snap_jsonl "pgferry \`snapshot = \"initial\"\` → JSONL ($SNAP_ROWS read events, checked), \`--exit-after-snapshot\`")"
    SUMMARY+=("| snapshot of $SNAP_ROWS rows vs COPY TO /dev/null: into null / into JSONL | $(ratio "$COPYS" "$(fsecs snap_null)")× / $(ratio "$COPYS" "$(fsecs snap_jsonl)")× ($(rate "$SNAP_ROWS" "$(fsecs snap_null)") / $(rate "$SNAP_ROWS" "$(fsecs snap_jsonl)") rows/s) | (measure) | – |")
  else
    log "snapshot: pgferry has no --exit-after-snapshot yet: n/a"
    SROWS="| pgferry \`snapshot = \"initial\"\`, \`--exit-after-snapshot\` | n/a | n/a | n/a | n/a |"
    SUMMARY+=("| snapshot vs COPY TO /dev/null | n/a | (measure) | – |")
  fi
  section "### Snapshot of a $SNAP_ROWS-row table (whole pgferry process: start, slot, snapshot, exit)

| reader | seconds | rows/s | vs COPY | peak RSS |
|---|---:|---:|---:|---:|
| \`COPY snap TO STDOUT\` → /dev/null (psql) | $COPYS | $(rate "$SNAP_ROWS" "$COPYS") | 1.00× | – |
$SROWS"
fi

# ---------------------------------------------------------------- report
CPU="$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
MEM="$(free -g | awk '/^Mem:/ {print $2}') GiB"
{
  echo "## pgferry benchmarks, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Machine: $(nproc) CPUs ($CPU), $MEM RAM, load average at the end $(cut -d' ' -f1-3 /proc/loadavg);"
  echo "$(uname -sr); PostgreSQL $PGVERSION (\`fsync=off\`; the workload commits with \`synchronous_commit=off\`); $(rustc --version)."
  echo "Workload: $CHANGES row changes ($WAL of WAL). All figures from this one run."
  echo
  echo "| benchmark | result | goal | status |"
  echo "|---|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo "$SECTIONS"
} | tee "$OUT"
log "written to $OUT"
