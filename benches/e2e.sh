#!/usr/bin/env bash
# The end-to-end part of benches/run.sh alone (kept for its old name):
# the server's own decode, pg_recvlogical and pgferry on the same WAL.
# ROWS scales the workload (default 1M); see run.sh for the other knobs.
BENCHES=e2e exec bash "$(dirname "$0")/run.sh" "$@"
