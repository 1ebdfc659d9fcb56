"""Kafka helpers of benches/run.sh (BENCHES=kafka).

usage:
  kafka_bench.py count BOOTSTRAP PREFIX
      prints the number of records with a value, and of tombstones, in the
      topics named PREFIX.*, read from the beginning with read_committed.
  kafka_bench.py latency PG_CONNINFO BOOTSTRAP TOPIC TPS SECONDS
      commit -> visible to a read_committed consumer, at a steady rate.

The latency driver commits TPS transactions a second, each updating one of
the 1,000 rows of `klat` with a sequence number, and notes when COMMIT's
reply arrived; a consumer process (isolation.level=read_committed,
fetch.wait.max.ms=10) notes when the record of each sequence number arrived. Both use CLOCK_MONOTONIC.
The first second is a warm-up and is not counted. Prints: n p50 p99 max (ms,
from COMMIT's reply) p50 p99 max (ms, from sending the UPDATE) rate
negatives.
"""
import json
import multiprocessing as mp
import sys
import time

from confluent_kafka import Consumer, KafkaError, TopicPartition

from latency import drive, now_ns, summarize


def consumer(bootstrap, group, **extra):
    return Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        **extra,
    })


def count(bootstrap, prefix):
    c = consumer(bootstrap, "bench-count")
    md = c.list_topics(timeout=30)
    parts = [TopicPartition(t, p, 0) for t, m in md.topics.items() if t.startswith(prefix + ".")
             for p in m.partitions]
    c.assign(parts)
    ends, values, tombstones = set(), 0, 0
    while len(ends) < len(parts):
        m = c.poll(1.0)
        if m is None:
            continue
        if m.error():
            if m.error().code() == KafkaError._PARTITION_EOF:
                ends.add((m.topic(), m.partition()))
                continue
            raise SystemExit(f"count: {m.error()}")
        if m.value() is None:
            tombstones += 1
        else:
            values += 1
    c.close()
    print(values, tombstones)


def subscribe(bootstrap, topic, ready, stop, out):
    # A consumer tuned for latency: the broker answers a fetch at once when
    # records are there, and otherwise holds it at most 10 ms (librdkafka's
    # default fetch.wait.max.ms is 500 ms).
    c = consumer(bootstrap, "bench-latency", **{"fetch.wait.max.ms": 10})
    md = c.list_topics(topic, timeout=30)
    parts = [TopicPartition(topic, p, -1) for p in md.topics[topic].partitions]  # -1: the end
    c.assign(parts)
    c.poll(0.5)
    ready.set()
    seen = {}
    while not stop.is_set():
        m = c.poll(0.05)
        if m is None or m.error() or m.value() is None:
            continue
        t = now_ns()
        seen[int(json.loads(m.value())["after"]["seq"])] = t
    c.close()
    out.put(seen)


def latency(conninfo, bootstrap, topic, tps, secs):
    import psycopg
    ready, stop, out = mp.Event(), mp.Event(), mp.Queue()
    sub = mp.Process(target=subscribe, args=(bootstrap, topic, ready, stop, out))
    sub.start()
    ready.wait(60)
    time.sleep(1)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = on")

        def update(i):
            conn.execute("UPDATE klat SET seq = %s WHERE id = %s", (i + 1, i % 1000 + 1), prepare=True)
            return i + 1

        commits, t_first, t_last = drive(update, tps, secs)
    time.sleep(15)  # the tail: a loaded machine can lag seconds
    stop.set()
    seen = out.get(timeout=60)
    sub.join()
    lat, lat_send, missing = [], [], 0
    for seq, t, t_send, counted in commits:
        if seq not in seen:
            missing += 1
            continue
        if counted:
            lat.append((seen[seq] - t) / 1e6)
            lat_send.append((seen[seq] - t_send) / 1e6)
    if missing:
        print(f"kafka_bench.py: {missing} commits never reached the consumer", file=sys.stderr)
        sys.exit(1)
    print(summarize(lat, lat_send, t_first, t_last))


if __name__ == "__main__":
    if sys.argv[1] == "count":
        count(sys.argv[2], sys.argv[3])
    else:
        latency(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), float(sys.argv[6]))
