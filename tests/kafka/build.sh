#!/usr/bin/env bash
# Build the embedded Kafka test broker: compiles Launcher and writes the runtime
# classpath to target/cp.txt. Idempotent; prints nothing on success.
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/../support/build-launcher.sh" "$here"
