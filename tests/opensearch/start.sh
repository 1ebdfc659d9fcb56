#!/usr/bin/env bash
# Usage: start.sh HOME PORT
# Starts the embedded single-node OpenSearch in the background (log: HOME/logs/node.log),
# waits until it is configured and GET /_cluster/health?wait_for_status=green answers 200
# (at most OPENSEARCH_START_TIMEOUT seconds, default 120), then prints its PID.
# Stop it with: kill PID   (the shutdown hook closes the node; exit takes ~2 s).
# JVM options: OPENSEARCH_JAVA_OPTS (default "-Xms512m -Xmx512m").
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 HOME PORT" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
home=$1
port=$2
timeout=${OPENSEARCH_START_TIMEOUT:-120}

if [ ! -f "$here/target/cp.txt" ] || [ ! -f "$here/target/classes/Launcher.class" ]; then
    "$here/build.sh"
fi

mkdir -p "$home/logs"
home=$(cd "$home" && pwd)
rm -f "$home/logs/ready"
log="$home/logs/node.log"

# shellcheck disable=SC2086
nohup java ${OPENSEARCH_JAVA_OPTS:--Xms512m -Xmx512m} \
    -cp "$here/target/classes:$(cat "$here/target/cp.txt")" \
    Launcher "$home" "$port" </dev/null >"$log" 2>&1 &
pid=$!

deadline=$((SECONDS + timeout))
while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "start.sh: OpenSearch (pid $pid) exited during start-up; last lines of $log:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
    if [ -f "$home/logs/ready" ]; then
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 \
            "http://127.0.0.1:$port/_cluster/health?wait_for_status=green&timeout=1s" || true)
        if [ "$code" = 200 ]; then
            echo "$pid"
            exit 0
        fi
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "start.sh: OpenSearch not ready after ${timeout}s (pid $pid, left running); last lines of $log:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
    sleep 0.5
done
