#!/usr/bin/env bash
# Usage: smoke.sh PORT
# Checks a running test node (see start.sh) with curl: index with mapping, _bulk with
# external versions (lower/equal -> 409 item, higher wins), external-versioned delete,
# partial update without version, mapping error -> 400 item, _refresh, _count, GET _doc.
# Uses index "smoke_idx" (dropped first). Prints each response; exits non-zero on a failed check.
set -uo pipefail
port=${1:?usage: smoke.sh PORT}
B="http://127.0.0.1:$port"
fails=0
req() { # METHOD PATH [BODY-FILE CONTENT-TYPE]
    local m=$1 p=$2
    if [ $# -ge 4 ]; then
        curl -s -X "$m" "$B$p" -H "Content-Type: $4" --data-binary "@$3" -w '\n%{http_code}'
    else
        curl -s -X "$m" "$B$p" -w '\n%{http_code}'
    fi
}
check() { # NAME RESPONSE EXPECTED-CODE [REGEX...]
    local name=$1 resp=$2 want=$3; shift 3
    local code=${resp##*$'\n'} body=${resp%$'\n'*} ok=1 re
    [ "$code" = "$want" ] || ok=0
    for re in "$@"; do grep -Eq -- "$re" <<<"$body" || ok=0; done
    echo "[$( [ $ok = 1 ] && echo ok || echo FAIL )] $name -> HTTP $code"
    echo "    $body"
    [ $ok = 1 ] || fails=$((fails + 1))
}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

curl -s -o /dev/null -X DELETE "$B/smoke_idx"
cat >"$tmp/mapping.json" <<'J'
{"mappings":{"properties":{"name":{"type":"text"},"n":{"type":"integer"},"tag":{"type":"keyword"}}}}
J
check "create index with mapping" "$(req PUT /smoke_idx "$tmp/mapping.json" application/json)" 200 '"acknowledged":true'
check "index health green (0 replicas)" "$(req GET '/_cluster/health/smoke_idx?wait_for_status=green&timeout=10s')" 200 '"status":"green"'

cat >"$tmp/b1.ndjson" <<'J'
{"index":{"_index":"smoke_idx","_id":"1","version":5,"version_type":"external"}}
{"name":"alice","n":1,"tag":"a"}
{"index":{"_index":"smoke_idx","_id":"2","version":5,"version_type":"external"}}
{"name":"bob","n":2,"tag":"b"}
{"index":{"_index":"smoke_idx","_id":"3","version":5,"version_type":"external"}}
{"name":"carol","n":3,"tag":"c"}
J
check "bulk index v5 x3" "$(req POST /_bulk "$tmp/b1.ndjson" application/x-ndjson)" 200 '"errors":false' '"_version":5'

cat >"$tmp/b2.ndjson" <<'J'
{"index":{"_index":"smoke_idx","_id":"1","version":4,"version_type":"external"}}
{"name":"alice-OLD","n":100,"tag":"old"}
{"index":{"_index":"smoke_idx","_id":"1","version":5,"version_type":"external"}}
{"name":"alice-SAME","n":101,"tag":"same"}
{"index":{"_index":"smoke_idx","_id":"2","version":9,"version_type":"external"}}
{"name":"bob-NEW","n":20,"tag":"new"}
{"delete":{"_index":"smoke_idx","_id":"3","version":7,"version_type":"external"}}
{"update":{"_index":"smoke_idx","_id":"1"}}
{"doc":{"tag":"patched"}}
{"index":{"_index":"smoke_idx","_id":"4","version":1,"version_type":"external"}}
{"name":"dave","n":"not-a-number"}
J
r=$(req POST /_bulk "$tmp/b2.ndjson" application/x-ndjson)
check "bulk: v4<5 -> 409, v5=5 -> 409, v9 wins, delete v7, update w/o version, bad int -> 400" "$r" 200 \
    '"errors":true' \
    '"_id":"1","status":409,"error":\{"type":"version_conflict_engine_exception"' \
    '"_id":"2","_version":9,"result":"updated"' \
    '"delete":\{"_index":"smoke_idx","_id":"3","_version":7,"result":"deleted"' \
    '"update":\{"_index":"smoke_idx","_id":"1","_version":6,"result":"updated"' \
    '"_id":"4","status":400,"error":\{"type":"mapper_parsing_exception"'

check "refresh" "$(req POST /smoke_idx/_refresh)" 200
check "count = 2" "$(req GET /smoke_idx/_count)" 200 '"count":2'
check "doc 1: original body + patched tag" "$(req GET /smoke_idx/_doc/1)" 200 '"name":"alice"' '"tag":"patched"'
check "doc 2: v9 body" "$(req GET /smoke_idx/_doc/2)" 200 '"_version":9' '"name":"bob-NEW"'
check "doc 3: deleted" "$(req GET /smoke_idx/_doc/3)" 404 '"found":false'

cat >"$tmp/b3.ndjson" <<'J'
{"index":{"_index":"smoke_idx","_id":"3","version":6,"version_type":"external"}}
{"name":"carol-STALE"}
J
check "re-index deleted doc below delete version -> 409" "$(req POST /_bulk "$tmp/b3.ndjson" application/x-ndjson)" 200 '"status":409'

cat >"$tmp/b4.ndjson" <<'J'
{"update":{"_index":"smoke_idx","_id":"1","version":9,"version_type":"external"}}
{"doc":{"tag":"x"}}
J
check "versioned update rejects the whole bulk -> 400" "$(req POST /_bulk "$tmp/b4.ndjson" application/x-ndjson)" 400 'Update requests do not support versioning'

printf '%s\n' '{"index":{"_index":"smoke_idx","_id":"6"}}' '{"name":"frank"}' >"$tmp/b5.ndjson"
check "version/version_type as _bulk URL params -> 400" "$(req POST '/_bulk?version_type=external&version=7' "$tmp/b5.ndjson" application/x-ndjson)" 400 'unrecognized parameters'

curl -s -o /dev/null -X DELETE "$B/smoke_idx"
total=13
echo "$((total - fails)) passed, $fails failed"
[ "$fails" = 0 ]
