"""Per-layer scale files and the merged scale cache.

Layer file (safetensors, `layer_NNN.safetensors` in a search chunk's folder): `scale.{k}` (C_in,) fp32
per group k, `alpha` (G,), `losses` (G, n_candidates: the grid, or RTN and SmoothQuant's scales),
`best` (G,) index of the kept candidate; metadata: layer index, model, run settings, and per group
its names and reweight ratio ρ (`ratio`, null without reweighting).
Scale cache (torch.save, loads with weights_only=True):
  {"scale": [(prev_op_name, (linear names…), scales_fp32), …], "meta": {...}}
with names relative to the decoder-layer stack (`layers.{i}.…`).
"""
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vlmquant import paths
from vlmquant.errors import VlmquantError
from vlmquant.io import tensors as tensor_file
from vlmquant.io.atomic import atomic_path


def save_layer(path, index, groups, results, ratios, meta):
    """Write one layer's search results. groups: ScaleGroups; results: GroupResults; ratios: per group or None."""
    tensors = {f"scale.{k}": r.scales.detach().float().cpu().contiguous() for k, r in enumerate(results)}
    tensors["alpha"] = torch.tensor([r.alpha for r in results], dtype=torch.float32)
    tensors["losses"] = torch.tensor([r.losses for r in results], dtype=torch.float32)
    tensors["best"] = torch.tensor([r.best_index for r in results], dtype=torch.int64)
    info = {**meta, "layer": index,
            "groups": [{"prev": g.prev, "linears": list(g.linears), "block": g.block, "ratio": ratio}
                       for g, ratio in zip(groups, ratios)]}
    tensor_file.save(path, tensors, info)


def load_layer(path):
    return tensor_file.load(path, "scale file")


def chunk_layer_files(chunk_dirs):
    """The layer files of search chunk folders (paths.SCALES), in layer order."""
    return [p for d in chunk_dirs for p in sorted(Path(d).glob(paths.LAYER_GLOB))]


def merge(layer_paths, cache_path, table_path, expect):
    """Check every layer file against `expect` (model, run settings…), write the cache and a table."""
    entries, rows = [], []
    for want, path in enumerate(layer_paths):
        tensors, info = load_layer(path)
        for key, value in expect.items():
            if info.get(key) != value:
                raise VlmquantError(f"{path}: scale file is for {key}={info.get(key)!r}, expected {value!r} "
                                    "(from another model or run; delete it and rerun)")
        if info["layer"] != want:
            raise VlmquantError(f"{path}: holds layer {info['layer']}, expected layer {want}")
        for k, g in enumerate(info["groups"]):
            prefix = f"layers.{want}."
            entries.append((prefix + g["prev"], tuple(prefix + n for n in g["linears"]), tensors[f"scale.{k}"]))
            losses = tensors["losses"][k]
            best = int(tensors["best"][k])
            rows.append({"layer": want, "group": g["prev"], "linears": ",".join(g["linears"]),
                         "alpha": float(tensors["alpha"][k]), "loss": float(losses[best]),
                         "rtn_loss": float(losses[0]), "ratio": g["ratio"]})
    save_cache({"scale": entries, "meta": {**expect, "n_layers": len(layer_paths)}}, cache_path)
    with atomic_path(table_path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)


def save_cache(cache, path):
    """Write a scale cache dict with torch.save, atomically (it loads with torch.load(weights_only=True))."""
    buf = io.BytesIO()  # via a buffer: torch.save names the archive after the file, which is temporary
    torch.save(cache, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def load_cache(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise VlmquantError(f"{path}: not a scale cache ({type(e).__name__}: {e})") from None
