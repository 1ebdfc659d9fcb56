#!/usr/bin/env bash
# Usage: start.sh HOME PORT
# Starts the embedded single-node Kafka broker (KRaft, broker+controller) in the
# background (log: HOME/node.log), waits until it has written HOME/ready (the broker is
# unfenced and serving; at most KAFKA_START_TIMEOUT seconds, default 120), then prints
# its PID. The same HOME restarts the same broker with its data.
# Stop it with: kill PID   (the shutdown hook stops the server cleanly), or kill -9.
# JVM options: KAFKA_JAVA_OPTS (default "-Xms256m -Xmx512m").
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 HOME PORT" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
home=$1
port=$2
timeout=${KAFKA_START_TIMEOUT:-120}

if [ ! -f "$here/target/cp.txt" ] || [ ! -f "$here/target/classes/Launcher.class" ]; then
    "$here/build.sh"
fi

mkdir -p "$home"
home=$(cd "$home" && pwd)
rm -f "$home/ready"
log="$home/node.log"

# shellcheck disable=SC2086
nohup java ${KAFKA_JAVA_OPTS:--Xms256m -Xmx512m} \
    -cp "$here/target/classes:$(cat "$here/target/cp.txt")" \
    Launcher "$home" "$port" </dev/null >>"$log" 2>&1 &
pid=$!

deadline=$((SECONDS + timeout))
while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "start.sh: Kafka (pid $pid) exited during start-up; last lines of $log:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
    if [ -f "$home/ready" ]; then
        echo "$pid"
        exit 0
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "start.sh: Kafka not ready after ${timeout}s (pid $pid, left running); last lines of $log:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
    sleep 0.2
done
