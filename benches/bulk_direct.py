"""A direct `_bulk` load of the changes in a pgferry JSONL file (benches/run.sh).

usage: bulk_direct.py EVENTS.jsonl BASE_URL INDEX BATCH [MAX_OPS]

Builds, before timing, the `_bulk` bodies the opensearch sink would send for
the `items` changes: `index` with the row (the `after` object's text, byte
for byte) or `delete`, `_id` the key, external version the change's LSN, at
most BATCH operations a request. Then POSTs them one after another on one
keep-alive connection and checks every reply. Prints: seconds operations
requests.
"""
import http.client
import json
import sys
import time
from urllib.parse import urlparse


def lsn(s):
    hi, lo = s.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def main():
    path, base, index, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    limit = int(sys.argv[5]) if len(sys.argv) > 5 else None
    bodies, cur, n, ops = [], [], 0, 0
    with open(path, "rb") as f:
        for line in f:
            ev = json.loads(line)
            if ev["table"] != "items" or ev["op"] in ("schema", "ddl"):
                continue
            if limit is not None and ops >= limit:
                break
            meta = {"_index": index, "_id": str(ev["key"]["id"]), "version": lsn(ev["lsn"]), "version_type": "external"}
            if ev["op"] == "delete":
                cur.append(json.dumps({"delete": meta}, separators=(",", ":")).encode())
            else:
                a = line.index(b'"after":') + len(b'"after":')
                b = line.index(b',"lsn":"', a)
                cur.append(json.dumps({"index": meta}, separators=(",", ":")).encode())
                cur.append(line[a:b])
            n += 1
            ops += 1
            if n == batch:
                bodies.append(b"\n".join(cur) + b"\n")
                cur, n = [], 0
    if cur:
        bodies.append(b"\n".join(cur) + b"\n")
    u = urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port)
    t0 = time.monotonic()
    for body in bodies:
        conn.request("POST", "/_bulk", body, {"Content-Type": "application/x-ndjson"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            sys.exit(f"_bulk: HTTP {r.status}: {data[:300]!r}")
        if b'"errors":true' in data[:100]:
            sys.exit(f"_bulk: item errors: {data[:500]!r}")
    t1 = time.monotonic()
    print(f"{t1 - t0:.2f} {ops} {len(bodies)}")


if __name__ == "__main__":
    main()
