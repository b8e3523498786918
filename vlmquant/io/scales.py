"""Per-layer scale files and the merged scale cache.

Layer file (safetensors, `layer_NNN.safetensors` in a search chunk's folder): `scale.{k}` (C_in,) fp32
per group k, `alpha` (G,), `losses` (G, n_candidates: the grid, or RTN and SmoothQuant's scales),
`best` (G,) index of the kept candidate; metadata: layer index, model, run settings, per group its
names (prev, every consumer folding scales) and reweight ratio ρ (`ratio`, null without reweighting),
and the groups of the layer's kind that did not apply, with the reason (`skipped`); NVFP4 W4A4 runs add
`input_amax` {layers.{i}.<linear>: amax of its scaled calibration input} (search.act_scales), merged into the
cache's meta.
A per-expert group (fused MoE experts) k has `scale.{k}` (E, I) and per expert `experts.{k}.alpha`
(E,), `experts.{k}.losses` (E, n_candidates), `experts.{k}.best` (E,), `experts.{k}.tokens` (E,)
(routed calibration tokens in its loss; 0: α stays 0); its `alpha` is the mean over experts with
tokens, its `losses` the sum over experts, its `best` −1.
Scale cache (torch.save, loads with weights_only=True):
  {"scale": [(prev_op_name, (linear names…), scales_fp32), …], "meta": {...}}
with names relative to the decoder-layer stack (`layers.{i}.…`); scales (C,), or (E, C) for a per-expert group.
Search table (merge): one row per group and layer, one per expert for a per-expert group (`expert`,
`tokens`), one with a `note` and no α for a group that did not apply.
GPTQ runs (search.gptq_layer): per GPTQ-rounded weight `gptq.{name}.codes`, `.scale` [, `.zero_point`] (a fused
expert weight's stacked over experts) and per result `.tokens`, `.error`, `.rtn_error`, `.rtn` in the layer file,
`gptq` [{name, ratio}] in its metadata; the cache adds {"gptq": {"layers.{i}.{name}": {"codes", "scale"[,
"zero_point"], "rtn"}}}, and the table a row per weight (per expert) with group "gptq", loss = its calibration
output error, rtn_loss = round to nearest's, and the experts rounded to nearest for lack of tokens noted.
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
from vlmquant.io.fingerprint import check_finite
from vlmquant.io.provenance import check_weights


def rtn_losses(result):
    """The α = 0 (RTN) loss of a group result, as a list: one, or one per expert."""
    losses = result.losses
    return losses[:, 0].tolist() if isinstance(losses, torch.Tensor) and losses.dim() == 2 else [losses[0]]


def save_layer(path, index, groups, results, ratios, meta, gptq=None):
    """Write one layer's search results. groups: ScaleGroups; results: GroupResults (ExpertsResults for
    per-expert groups); ratios: per group or None; gptq: (tensors, records) of the layer's GPTQ weights
    (search.gptq_layer.rounded_tensors), None for runs without GPTQ."""
    tensors = {f"scale.{k}": r.scales.detach().float().cpu().contiguous() for k, r in enumerate(results)}
    alpha, losses, best = [], [], []
    for k, r in enumerate(results):
        if hasattr(r, "tokens"):  # per expert
            tensors.update({f"experts.{k}.alpha": r.alpha.float(), f"experts.{k}.losses": r.losses.float(),
                            f"experts.{k}.best": r.best.long(), f"experts.{k}.tokens": r.tokens.long()})
            seen = r.tokens > 0
            alpha.append(float(r.alpha[seen].mean()) if seen.any() else float("nan"))
            losses.append(r.losses.sum(0).tolist())
            best.append(-1)
        else:
            alpha.append(r.alpha)
            losses.append(list(r.losses))
            best.append(r.best_index)
    tensors["alpha"] = torch.tensor(alpha, dtype=torch.float32)
    tensors["losses"] = torch.tensor(losses, dtype=torch.float32)
    tensors["best"] = torch.tensor(best, dtype=torch.int64)
    info = {**meta, "layer": index,
            "groups": [{"prev": g.prev, "linears": list(g.consumers), "block": g.block, "ratio": ratio}
                       for g, ratio in zip(groups, ratios)]}
    if gptq is not None:
        tensors.update(gptq[0])
        info["gptq"] = gptq[1]
    tensor_file.save(path, tensors, info)


def load_layer(path):
    return tensor_file.load(path, "scale file")


def chunk_layer_files(chunk_dirs):
    """The layer files of search chunk folders (paths.SCALES), in layer order."""
    return [p for d in chunk_dirs for p in sorted(Path(d).glob(paths.LAYER_GLOB))]


def merge(layer_paths, cache_path, table_path, expect):
    """Check every layer file against `expect` (model, run settings…), write the cache and a table."""
    entries, rows, stored, amax = [], [], {}, {}
    for want, path in enumerate(layer_paths):
        tensors, info = load_layer(path)
        for key, value in expect.items():
            if info.get(key) != value:
                raise VlmquantError(f"{path}: scale file is for {key}={info.get(key)!r}, expected {value!r} "
                                    "(from another model or run; delete it and rerun)")
        if info["layer"] != want:
            raise VlmquantError(f"{path}: holds layer {info['layer']}, expected layer {want}")
        prefix = f"layers.{want}."
        amax.update(info.get("input_amax", {}))  # NVFP4 W4A4: amax of each linear's scaled input (search.act_scales)
        for k, g in enumerate(info["groups"]):
            entries.append((prefix + g["prev"], tuple(prefix + n for n in g["linears"]), tensors[f"scale.{k}"]))
            row = {"layer": want, "group": g["prev"], "linears": ",".join(g["linears"]), "ratio": g["ratio"]}
            if f"experts.{k}.alpha" in tensors:
                e_best, e_losses = tensors[f"experts.{k}.best"], tensors[f"experts.{k}.losses"]
                for e, tokens in enumerate(tensors[f"experts.{k}.tokens"].tolist()):
                    rows.append({**row, **table_row(float(tensors[f"experts.{k}.alpha"][e]), e_losses[e],
                                                    int(e_best[e]), e, tokens,
                                                    None if tokens else "no calibration token routed: α = 0 (RTN)")})
            else:
                losses = tensors["losses"][k]
                rows.append({**row, **table_row(float(tensors["alpha"][k]), losses, int(tensors["best"][k]))})
        for r in info.get("gptq", []):
            stored[prefix + r["name"]], gptq_rows = gptq_entry(tensors, r)
            rows += [{"layer": want, **row} for row in gptq_rows]
        for g in info.get("skipped", []):
            rows.append({"layer": want, "group": g["prev"], "linears": ",".join(g["linears"]), "ratio": None,
                         **table_row(None, None, None, note=f"skipped: {g['reason']}")})
    extra = {"input_amax": amax} if amax else {}
    save_cache({"scale": entries, **({"gptq": stored} if stored else {}),
                "meta": {**expect, "n_layers": len(layer_paths), **extra}}, cache_path)
    with atomic_path(table_path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=TABLE_SCHEMA), tmp)


TABLE_SCHEMA = pa.schema([("layer", pa.int64()), ("group", pa.string()), ("linears", pa.string()),
                          ("alpha", pa.float64()), ("loss", pa.float64()), ("rtn_loss", pa.float64()),
                          ("ratio", pa.float64()), ("expert", pa.int64()), ("tokens", pa.int64()),
                          ("note", pa.string())])


def gptq_entry(tensors, record):
    """(the scale cache's GPTQ entry of one weight: {"codes", "scale"[, "zero_point"], "rtn"}, its search-table
    rows) from a layer file's tensors and its `gptq` record {"name", "ratio"}."""
    key = f"gptq.{record['name']}"
    entry = {k: tensors[f"{key}.{k}"] for k in ("codes", "scale", "zero_point", "rtn") if f"{key}.{k}" in tensors}
    fused = entry["codes"].dim() == 3
    rows = []
    for e, (tokens, error, rtn_error, rtn) in enumerate(zip(tensors[f"{key}.tokens"].tolist(),
                                                             tensors[f"{key}.error"].tolist(),
                                                             tensors[f"{key}.rtn_error"].tolist(), entry["rtn"].tolist())):
        note = f"gptq: {tokens} calibration tokens, rounded to nearest" if rtn else None
        rows.append({"group": "gptq", "linears": record["name"], "ratio": record["ratio"],
                     **table_row(None, [rtn_error, error], 1, e if fused else None, tokens, note)})
    return entry, rows


def table_row(alpha, losses, best, expert=None, tokens=None, note=None):
    """The search-table columns of one group (or expert): chosen α, its loss, the RTN loss (α = 0)."""
    return {"alpha": alpha, "loss": None if losses is None else float(losses[best]),
            "rtn_loss": None if losses is None else float(losses[0]), "expert": expert, "tokens": tokens,
            "note": note}


def save_cache(cache, path):
    """Write a scale cache dict with torch.save, atomically (it loads with torch.load(weights_only=True))."""
    check_finite({f"scales of {prev}": s for prev, _, s in cache.get("scale", [])}, path)
    buf = io.BytesIO()  # via a buffer: torch.save names the archive after the file, which is temporary
    torch.save(cache, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def load_cache(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise VlmquantError(f"{path}: not a scale cache ({type(e).__name__}: {e})") from None


def check_cache_weights(cache_path, folder, cache=None):
    """check_weights on a scale cache's metadata ("meta"."weights") against the model folder `folder`; no cache (RTN)
    passes. `cache`: the file's contents when already loaded."""
    if cache_path is None:
        return
    cache = load_cache(cache_path) if cache is None else cache
    meta = cache.get("meta") if isinstance(cache, dict) else None
    check_weights((meta or {}).get("weights"), folder, f"{cache_path}: scale cache")
