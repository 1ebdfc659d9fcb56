#!/usr/bin/env bash
# Creates (once) the Python venv with the independent Iceberg readers: pyiceberg (SQL
# catalog over sqlite, pyarrow) and duckdb, pinned in requirements.txt, from the Python
# package registry. Prints the venv's python on success; prints pip's output only if it
# fails. The venv goes to $PGFERRY_ICEBERG_VENV (default: tests/iceberg/.venv) and is
# rebuilt when requirements.txt changes.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${PGFERRY_ICEBERG_VENV:-$here/.venv}
stamp="$venv/.requirements"
if [ -x "$venv/bin/python" ] && cmp -s "$here/requirements.txt" "$stamp"; then
    echo "$venv/bin/python"
    exit 0
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
run() {
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "setup-venv.sh: failed: $*" >&2
        exit 1
    fi
}
rm -rf "$venv"
run python3 -m venv "$venv"
run "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$here/requirements.txt"
cp "$here/requirements.txt" "$stamp"
echo "$venv/bin/python"
