"""Export a pseudo-quantized Hugging Face checkpoint (DESIGN.md, algorithm step 6).

fp model → fold the run's scale cache → fake-quantize every language-decoder linear (never the
vision tower, embeddings or lm_head; minus `export.ignore`) → an ordinary HF folder:

    config.json, generation_config.json, model*.safetensors (+ index), processor/tokenizer files,
    quantization.json   method, bits, group, scale-cache sha256, source model, run, ignored modules
    scales.safetensors  the scales folded into the weights (absent for RTN), to unfold them again

The quantization.json dict is also stored as JSON under the `vlmquant` key of every shard's
safetensors metadata. The weights are plain floats, so the folder loads with the family's
`from_pretrained` and needs nothing from this package.

Everything that can fail runs before anything is written; the folder is written under a temporary
name and renamed at the end, so a folder named like the output is always complete.
"""
import json
import logging
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmquant.errors import VlmquantError
from vlmquant.io.atomic import atomic_dir, atomic_path
from vlmquant.io.provenance import dumps, package_versions, sha256_file
from vlmquant.io.scales import load_cache
from vlmquant.models import get_adapter
from vlmquant.models.loading import resolve_device, resolve_dtype
from vlmquant.quant.fake import check_weight_groups
from vlmquant.quant.model import (apply_scale_cache, decoder_linears, groups_to_fold, layer_root, pseudo_quantize,
                                  resolve_ignore)

log = logging.getLogger(__name__)

QUANT_FILE = "quantization.json"
SCALES_FILE = "scales.safetensors"
FORMAT = "vlmquant-pseudo-quant"
# files of the source folder that are not copied: weights, and what save_pretrained writes itself
SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".index.json")
SKIP_NAMES = {"config.json", "generation_config.json", "README.md", QUANT_FILE}


# --- scale cache checks ----------------------------------------------------------------------
def _layer_index(name):
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else None


def check_scale_cache(model, adapter, cache, source="scale cache"):
    """Raise a one-line VlmquantError unless every cache entry names modules of this model with matching shapes."""
    if not isinstance(cache, dict) or not isinstance(cache.get("scale"), (list, tuple)):
        raise VlmquantError(f"{source}: not a scale cache (no 'scale' list)")
    root = layer_root(model, adapter)
    n_layers = len(adapter.layers(model))
    covered = set()
    for k, entry in enumerate(cache["scale"]):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise VlmquantError(f"{source}: entry {k} is not (prev_op_name, linear names, scales)")
        prev_name, linear_names, s = entry
        if not isinstance(s, torch.Tensor) or s.dim() != 1:
            raise VlmquantError(f"{source}: entry {k} ({prev_name}): scales are not a 1-D tensor")
        if not torch.isfinite(s).all() or (s <= 0).any():
            raise VlmquantError(f"{source}: entry {k} ({prev_name}): scales must be finite and positive")
        modules = {}
        for name in (prev_name, *linear_names):
            i = _layer_index(name)
            try:
                modules[name] = root.get_submodule(name)
            except AttributeError:
                modules[name] = None
            if i is None or modules[name] is None:
                raise VlmquantError(f"{source}: module {name!r} does not exist in this model's {n_layers} "
                                    "decoder layers (scale cache from another model?)")
            covered.add(i)
        n = s.numel()
        for name in linear_names:
            lin = modules[name]
            if not isinstance(lin, torch.nn.Linear):
                raise VlmquantError(f"{source}: {name} is a {type(lin).__name__}, not a linear layer")
            if lin.in_features != n:
                raise VlmquantError(f"{source}: {name} has {lin.in_features} input channels, the cache has "
                                    f"{n} scales (scale cache from another model?)")
        prev = modules[prev_name]
        width = prev.out_features if isinstance(prev, torch.nn.Linear) else getattr(prev, "weight", torch.empty(0)).numel()
        if width != n:
            raise VlmquantError(f"{source}: {prev_name} has {width} output channels, the cache has {n} scales "
                                "(scale cache from another model?)")
    if covered != set(range(n_layers)):
        raise VlmquantError(f"{source}: covers decoder layers {sorted(covered)}, the model has {n_layers} "
                            "(scale cache from another model?)")


def check_cache_meta(cache, expect, source):
    """The cache's own metadata (model name, method, bits, group) must match what is being exported."""
    meta = cache.get("meta") or {}
    if "model" in meta and "model" in expect and meta["model"] != expect["model"]:
        raise VlmquantError(f"{source}: scale cache is for model {meta['model']!r}, exporting {expect['model']!r}")
    run = meta.get("run_config") or {}
    for key in ("method", "w_bit", "w_group"):
        if key in run and key in expect.get("run_config", {}) and run[key] != expect["run_config"][key]:
            raise VlmquantError(f"{source}: scale cache was searched with {key}={run[key]!r}, "
                                f"the run has {key}={expect['run_config'][key]!r}")


# --- in-memory quantization ------------------------------------------------------------------
@torch.no_grad()
def quantize_in_memory(model, adapter, run, cache=None, ignore=(), source="scale cache"):
    """Fold `cache` into `model` and fake-quantize its decoder linears, in place. Checks first, then changes.

    Scale groups whose linears are all ignored are skipped: their scales only serve the
    quantization of those linears. A partly ignored group is applied (to keep the fp function),
    so its ignored linears hold scaled, unquantized weights.
    Returns {"quantized", "ignored", "skipped_groups", "applied"}.
    """
    if run["method"] == "rtn" and cache is not None:
        raise VlmquantError(f"{source}: method rtn uses no scale cache")
    if run["method"] != "rtn" and cache is None:
        raise VlmquantError(f"method {run['method']} needs the run's scale cache")
    names = [n for n, _ in decoder_linears(model, adapter)]
    ignored = resolve_ignore(names, ignore)
    quantized = [n for n in names if n not in ignored]
    root = layer_root(model, adapter)
    for n in quantized:
        try:
            check_weight_groups(tuple(root.get_submodule(n).weight.shape), run["w_group"])
        except VlmquantError as e:
            raise VlmquantError(f"{n}: {e}") from None
    applied, skipped = [], []
    if cache is not None:
        check_scale_cache(model, adapter, cache, source)
        applied, skipped = groups_to_fold([(prev, tuple(linears), s) for prev, linears, s in cache["scale"]], ignored)
        apply_scale_cache(model, adapter, {"scale": applied}, source=source)
    pseudo_quantize(model, adapter, run, ignore=sorted(ignored))
    return {"quantized": quantized, "ignored": sorted(ignored), "skipped_groups": skipped, "applied": applied}


# --- writing ---------------------------------------------------------------------------------
def set_safetensors_metadata(path, extra):
    """Add string entries to a safetensors file's header metadata, streaming the data (no tensor in memory)."""
    path = Path(path)
    with open(path, "rb") as src:
        (n,) = struct.unpack("<Q", src.read(8))
        header = json.loads(src.read(n))
        header["__metadata__"] = {**header.get("__metadata__", {}), **extra}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
        with atomic_path(path) as tmp, open(tmp, "wb") as dst:
            dst.write(struct.pack("<Q", len(raw)))
            dst.write(raw)
            shutil.copyfileobj(src, dst, 16 << 20)


def shard_files(folder):
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def copy_processor_files(src, dst):
    """Top-level non-weight files of the source folder (tokenizer, processor, chat template, remote code)."""
    for f in sorted(Path(src).iterdir()):
        if (f.is_file() and not f.name.startswith(".") and f.name not in SKIP_NAMES
                and not f.name.endswith(SKIP_SUFFIXES) and not (Path(dst) / f.name).exists()):
            shutil.copy2(f, Path(dst) / f.name)


def save_scales(path, applied):
    tensors = {f"scale.{k}": s.detach().float().cpu().contiguous() for k, (_, _, s) in enumerate(applied)}
    groups = [[prev, list(linears)] for prev, linears, _ in applied]
    save_file(tensors, path, metadata={"vlmquant": dumps({"groups": groups})})


def load_scales(folder):
    """The scale entries folded into a checkpoint: [(prev, (linears…), s)], [] for RTN."""
    path = Path(folder) / SCALES_FILE
    if not path.is_file():
        return []
    with safe_open(path, "pt") as f:
        groups = json.loads(f.metadata()["vlmquant"])["groups"]
        return [(prev, tuple(linears), f.get_tensor(f"scale.{k}")) for k, (prev, linears) in enumerate(groups)]


def read_quant_info(folder):
    path = Path(folder) / QUANT_FILE
    if not path.is_file():
        raise VlmquantError(f"{folder}: no {QUANT_FILE} (not a complete vlmquant checkpoint; rerun the export)")
    return json.loads(path.read_text())


def remove_stale_temps(out_dir):
    """Temporary folders left by killed exports of the same output (never complete, never used)."""
    out_dir = Path(out_dir)
    for tmp in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
        if tmp.is_dir():
            log.info("removing %s, left by an interrupted export", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def export_checkpoint(model_cfg, run, out_dir, cache_path=None, ignore=(), max_shard_size="5GB", meta=None,
                      device="auto"):
    """fp model + scale cache (none for RTN) → pseudo-quantized HF folder at `out_dir`.

    model_cfg: models.<name> of the config; run: {method, w_bit, w_group[, a_bit]}; meta: model/calib/run names.
    """
    meta = dict(meta or {})
    adapter = get_adapter(model_cfg["family"])
    device = resolve_device(device)
    dtype = resolve_dtype(model_cfg.get("dtype"), device)
    source = str(cache_path) if cache_path else "scale cache"
    cache = None
    if cache_path is not None:
        cache = load_cache(cache_path)
        check_cache_meta(cache, {**meta, "run_config": run}, source)
    log.info("loading %s (%s, %s)", model_cfg["path"], dtype, device)
    model = adapter.load_model(model_cfg["path"], dtype, device, model_cfg.get("trust_remote_code", False))
    result = quantize_in_memory(model, adapter, run, cache, ignore, source)
    log.info("quantized %d decoder linears, ignored %d, skipped %d scale groups",
             len(result["quantized"]), len(result["ignored"]), len(result["skipped_groups"]))
    src = Path(model_cfg["path"])
    info = {
        "format": FORMAT, "version": 1,
        "method": run["method"], "w_bit": run["w_bit"], "w_group": run["w_group"], "a_bit": run.get("a_bit"),
        "quantizer": (f"weights symmetric abs-max per output channel; activations {run['a_bit']}-bit symmetric "
                      "abs-max per token at every quantized linear's input, applied at run time "
                      "(vlmquant.quant.model.quantized_activations)" if run.get("a_bit") else
                      "asymmetric min/max with zero point, groups of w_group input columns")
                     + " (weights stored dequantized, in the model dtype)",
        **{k: meta[k] for k in ("model", "calib", "run") if k in meta},
        "run_config": run,
        "source_model": str(src),
        "source_config_sha256": sha256_file(src / "config.json"),
        "scale_cache": str(cache_path) if cache_path else None,
        "scale_cache_sha256": sha256_file(cache_path) if cache_path else None,
        "dtype": str(dtype).removeprefix("torch."),
        "n_quantized": len(result["quantized"]),
        "ignore": list(ignore),
        "ignored_modules": result["ignored"],
        "skipped_scale_groups": result["skipped_groups"],
        "modules_relative_to": adapter.layers_path.rsplit(".", 1)[0],
        "packages": package_versions(),
    }
    remove_stale_temps(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        for shard in shard_files(tmp):
            set_safetensors_metadata(tmp / shard, {"vlmquant": dumps(info)})
        copy_processor_files(src, tmp)
        if result["applied"]:
            save_scales(tmp / SCALES_FILE, result["applied"])
        (tmp / QUANT_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info
