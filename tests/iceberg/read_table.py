#!/usr/bin/env python3
"""Reads an Iceberg table written by pgferry with two independent readers and prints
one JSON document on stdout.

    read_table.py CATALOG_DB CATALOG_NAME NAMESPACE.TABLE [--sql QUERY]

* pyiceberg's SqlCatalog (SQLAlchemy over the sqlite file CATALOG_DB, catalog name
  CATALOG_NAME) loads the table: format version, schema with field ids, every snapshot's
  summary, the current snapshot's summary, the data files, and the rows of a full scan.
* duckdb reads the current snapshot's Parquet data files directly (read_parquet with
  union_by_name, as a view named `t`) and runs QUERY (default: SELECT * FROM t).

Values that JSON cannot hold exactly are written as strings: decimals keep their digits,
timestamps are ISO 8601, binary is hex.
"""
import argparse
import datetime
import decimal
import json
import sys
import uuid

import duckdb
from pyiceberg.catalog.sql import SqlCatalog


def plain(v):
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("catalog_db", help="absolute path of the sqlite catalog file")
    ap.add_argument("catalog_name")
    ap.add_argument("table", help="NAMESPACE.TABLE")
    ap.add_argument("--sql", default="SELECT * FROM t")
    a = ap.parse_args()
    if not a.catalog_db.startswith("/"):
        ap.error("CATALOG_DB must be an absolute path")

    # SQLAlchemy's form: four slashes before an absolute path (sqlx takes three).
    cat = SqlCatalog(a.catalog_name, uri=f"sqlite:///{a.catalog_db}")
    t = cat.load_table(a.table)
    md = t.metadata
    snap = t.current_snapshot()
    files = [task.file.file_path for task in t.scan().plan_files()] if snap else []
    out = {
        "format_version": md.format_version,
        "schema": [
            {"id": f.field_id, "name": f.name, "type": str(f.field_type), "required": f.required}
            for f in t.schema().fields
        ],
        "snapshots": [
            {"id": s.snapshot_id, "parent": s.parent_snapshot_id,
             "summary": dict(s.summary.additional_properties) | {"operation": str(s.summary.operation.value)}}
            for s in md.snapshots
        ],
        "current": ({"id": snap.snapshot_id, "summary": dict(snap.summary.additional_properties)}
                    if snap else None),
        "files": files,
        "rows": plain(t.scan().to_arrow().to_pylist()) if snap else [],
    }
    if files:
        con = duckdb.connect()
        paths = [f.removeprefix("file://") for f in files]
        con.read_parquet(paths, union_by_name=True).create_view("t")
        cur = con.execute(a.sql)
        cols = [d[0] for d in cur.description]
        out["sql"] = [dict(zip(cols, plain(list(r)))) for r in cur.fetchall()]
    else:
        out["sql"] = []
    json.dump(out, sys.stdout, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
