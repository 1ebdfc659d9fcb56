"""Commit -> visible in Redis, at a steady rate (driver of benches/run.sh).

usage: latency.py PG_CONNINFO REDIS_PORT REDIS_DB TPS SECONDS

One process commits TPS transactions a second, each updating one of the
1,000 rows of `lat` (round robin), and notes when COMMIT's reply arrived.
Another process subscribes to Redis keyspace notifications for `lat:*` and
notes when each write arrived. Both use CLOCK_MONOTONIC, which is one clock
for the whole machine. Each row is written once a second, far apart, so the
n-th commit of a row pairs with the n-th notification of its key. The first
second is a warm-up and is not counted.

Prints: n p50 p99 max (ms, from COMMIT's reply) p50 p99 max (ms, from
sending the UPDATE, an upper bound) rate negatives. A latency from the reply
can be negative: the walsender may ship the commit before the client has
read and parsed the reply.
"""
import multiprocessing as mp
import sys
import time

CLOCK = time.CLOCK_MONOTONIC
ROWS = 1000


def now_ns():
    return time.clock_gettime_ns(CLOCK)


def subscribe(port, db, ready, stop, out):
    import redis

    r = redis.Redis(host="127.0.0.1", port=port, db=db)
    r.config_set("notify-keyspace-events", "K$")
    p = r.pubsub(ignore_subscribe_messages=True)
    p.psubscribe(f"__keyspace@{db}__:lat:*")
    p.get_message(timeout=1.0)
    ready.set()
    seen = []
    prefix = len(f"__keyspace@{db}__:")
    while not stop.is_set():
        m = p.get_message(timeout=0.05)
        if m is None:
            continue
        t = now_ns()
        if m["data"] == b"set":
            seen.append((m["channel"][prefix:].decode(), t))
    out.put(seen)


def drive(run, tps, secs):
    """Calls run(i) TPS times a second for one second of warm-up plus SECS.
    Returns ([(run's result, t_reply_ns, t_send_ns, counted)], the first
    counted reply, the last reply)."""
    commits = []
    warm = int(tps)
    total = warm + int(tps * secs)
    start = now_ns()
    period = 1e9 / tps
    t_first = None
    for i in range(total):
        d = start + int(i * period) - now_ns()
        if d > 0:
            time.sleep(d / 1e9)
        t_send = now_ns()
        key = run(i)
        t = now_ns()
        if i == warm:
            t_first = t
        commits.append((key, t, t_send, i >= warm))
    return commits, t_first, commits[-1][1]


def summarize(lat, lat_send, t_first, t_last):
    """The line run.sh reads: n p50 p99 max (from the reply) p50 p99 max
    (from sending) rate negatives."""
    lat.sort()
    lat_send.sort()
    q = lambda v, p: v[min(len(v) - 1, int(p * len(v)))]
    rate = (len(lat) - 1) / ((t_last - t_first) / 1e9)
    neg = sum(1 for x in lat if x < 0)
    return (
        f"{len(lat)} {q(lat, 0.5):.2f} {q(lat, 0.99):.2f} {lat[-1]:.2f}"
        f" {q(lat_send, 0.5):.2f} {q(lat_send, 0.99):.2f} {lat_send[-1]:.2f} {rate:,.0f} {neg}"
    )


def main():
    import psycopg

    conninfo, port, db, tps, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
    ready, stop, out = mp.Event(), mp.Event(), mp.Queue()
    sub = mp.Process(target=subscribe, args=(port, db, ready, stop, out))
    sub.start()
    ready.wait(10)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = on")

        def update(i):
            row = i % ROWS + 1
            conn.execute("UPDATE lat SET seq = %s, sent_at = clock_timestamp() WHERE id = %s", (i, row), prepare=True)
            return f"lat:{row}"

        commits, t_first, t_last = drive(update, tps, secs)
    time.sleep(2)
    stop.set()
    seen = out.get(timeout=30)
    sub.join()
    by_key = {}
    for k, t in seen:
        by_key.setdefault(k, []).append(t)
    pos = {}
    lat, lat_send = [], []
    missing = 0
    for k, t, t_send, counted in commits:
        n = pos.get(k, 0)
        pos[k] = n + 1
        ts = by_key.get(k, [])
        if n >= len(ts):
            missing += 1
            continue
        if counted:
            lat.append((ts[n] - t) / 1e6)
            lat_send.append((ts[n] - t_send) / 1e6)
    if missing:
        print(f"latency.py: {missing} commits never showed up in Redis", file=sys.stderr)
        sys.exit(1)
    print(summarize(lat, lat_send, t_first, t_last))


if __name__ == "__main__":
    main()
