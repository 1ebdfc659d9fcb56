#!/usr/bin/env bash
# Usage: build-launcher.sh DIR
# Builds the Maven launcher project in DIR (tests/opensearch, tests/kafka): compiles its
# Launcher and writes the runtime classpath to DIR/target/cp.txt. Idempotent; prints
# nothing on success. Maven 3.8 with -q still emits stray ANSI reset codes, so its output
# is captured and shown (without colour codes) only if a step fails.
set -uo pipefail
cd "$1"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
run() {
    if ! "$@" >"$log" 2>&1; then
        sed -e 's/\x1b\[[0-9;]*m//g' "$log" >&2
        echo "build-launcher.sh: failed in $PWD: $*" >&2
        exit 1
    fi
}
run mvn -q -B package
run mvn -q -B dependency:build-classpath -Dmdep.outputFile=target/cp.txt -Dmdep.includeScope=runtime
