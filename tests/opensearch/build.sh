#!/usr/bin/env bash
# Build the embedded OpenSearch test node: compiles Launcher and writes the runtime
# classpath to target/cp.txt. Idempotent; prints nothing on success.
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/../support/build-launcher.sh" "$here"
