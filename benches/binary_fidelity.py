"""Compares pgferry's JSONL rows (the `after` objects) with to_jsonb(row).

usage: binary_fidelity.py EVENTS.jsonl TO_JSONB.txt   (one to_jsonb per line, by id)
Numbers are compared as their text, so 1.50 and 1.5 differ. Exits 1 on a mismatch.
"""
import json
import sys


def load(s):
    return json.loads(s, parse_float=lambda x: ("num", x), parse_int=lambda x: ("num", x))


ours = {}
for line in open(sys.argv[1]):
    ev = load(line)
    if ev["op"] == "insert":
        ours[ev["after"]["id"][1]] = ev["after"]
theirs = {}
for line in open(sys.argv[2]):
    row = load(line)
    theirs[row["id"][1]] = row
bad = 0
for k, want in theirs.items():
    got = ours.get(k)
    if got != want:
        bad += 1
        for c in want:
            if got is None or got.get(c) != want[c]:
                print(f"row {k} column {c}: pgferry {None if got is None else got.get(c)!r}, to_jsonb {want[c]!r}", file=sys.stderr)
print(f"{len(theirs)} rows, {bad} differ")
sys.exit(1 if bad or not theirs else 0)
