"""The long eval table (`eval.parquet`, `fp.parquet`): one row per (metric, layer, modality).

Kept free of torch so the summary and plot jobs start fast.
"""
import json

import pyarrow as pa
import pyarrow.parquet as pq

from vlmquant.io.atomic import atomic_path
from vlmquant.io.provenance import dumps

SCHEMA = pa.schema([("model", pa.string()), ("calib", pa.string()), ("run", pa.string()),
                    ("eval_calib", pa.string()), ("metric", pa.string()), ("layer", pa.int64()),
                    ("modality", pa.string()), ("value", pa.float64())])


def write_table(rows, path, ids, provenance):
    """rows: (metric, layer, modality, value); ids: model, calib, run, eval_calib."""
    records = [{**ids, "metric": m, "layer": layer, "modality": mod, "value": float(v)} for m, layer, mod, v in rows]
    table = pa.Table.from_pylist(records, schema=SCHEMA)
    table = table.replace_schema_metadata({"vlmquant": dumps(provenance)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_table(path):
    """(pandas DataFrame, provenance dict) of an eval or fp table."""
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(b"vlmquant", b"{}"))
    df = table.to_pandas()
    df["layer"] = df["layer"].astype("Int64")
    return df, meta
