"""Export a pseudo-quantized Hugging Face checkpoint (DESIGN.md, algorithm step 6).

fp model → fold the run's scale cache → fake-quantize every language-decoder linear (never the
vision tower, embeddings or lm_head; minus `export.ignore`) → an ordinary HF folder:

    config.json, generation_config.json, model*.safetensors (+ index), processor/tokenizer files,
    quantization.json   method, bits, group, scale-cache sha256, source model, run, ignored modules
    scales.safetensors  the scales folded into the weights (absent for RTN), to unfold them again

GPTQ runs: the weights their search stored (the cache's "gptq" entries, io.scales) are written dequantized,
exactly (code - zero_point) x scale, in place of round to nearest.

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
from dataclasses import asdict
from pathlib import Path

import torch

from vlmquant.errors import VlmquantError
from vlmquant.export.shards import config_files, shard_bytes, write_streamed
from vlmquant.io import tensors
from vlmquant.io.atomic import atomic_dir, atomic_path
from vlmquant.io.fingerprint import nonfinite_counts, nonfinite_error
from vlmquant.io.model_folder import check_processor_files
from vlmquant.io.provenance import dumps, package_versions, sha256_file, weights_fingerprint
from vlmquant.io.scales import check_cache_weights, load_cache
from vlmquant.models.memory import use_streaming
from vlmquant.models.stream import StreamedModel
from vlmquant.quant.scheme import Scheme
from vlmquant.quant.codes import QuantizedWeight
from vlmquant.quant.fake import check_weight_groups
from vlmquant.quant.fold import fold, resolve_scales
from vlmquant.quant.fp4 import input_global_scales
from vlmquant.quant.model import (check_experts, decoder_experts, decoder_linears, groups_to_fold, layer_experts,
                                  layer_root, pseudo_quantize, quantize_linears, resolve_ignore)

log = logging.getLogger(__name__)

QUANT_FILE = "quantization.json"
SCALES_FILE = "scales.safetensors"
FORMAT = "vlmquant-pseudo-quant"
# files of the source folder that are not copied: weights, and what save_pretrained writes itself
SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".index.json")
SKIP_NAMES = {"config.json", "generation_config.json", "README.md", QUANT_FILE}


# --- in-memory quantization ------------------------------------------------------------------
def check_cache_meta(cache, spec, names, source):
    """The cache's own metadata (model name, method, bits, group) must match what is being exported."""
    meta = cache.get("meta") or {}
    if "model" in meta and names.get("model") and meta["model"] != names["model"]:
        raise VlmquantError(f"{source}: scale cache is for model {meta['model']!r}, exporting {names['model']!r}")
    run = meta.get("run_config") or {}
    want = spec.config()
    for key in ("method", "w_bit", "w_group", "a_bit"):
        if key in run and run[key] != want.get(key):
            raise VlmquantError(f"{source}: scale cache was searched with {key}={run[key]!r}, "
                                f"the run has {key}={want.get(key)!r}")


def resolve_export(model, adapter, spec, cache=None, source="scale cache"):
    """Every check of fold_for_export, nothing changed: (the resolved scale groups to fold (quant.fold.Fold), its
    result dict). `model` may be on the meta device (a streamed export checks the whole model before loading any
    layer)."""
    if not spec.has_cache and cache is not None:
        raise VlmquantError(f"{source}: method {spec.method} uses no scale cache")
    if spec.has_cache and cache is None:
        raise VlmquantError(f"method {spec.method} needs the run's scale cache")
    names = [n for n, _ in decoder_linears(model, adapter)]
    ignored = resolve_ignore(names, spec.ignore)
    quantized = [n for n in names if n not in ignored]
    root = layer_root(model, adapter)
    for n in quantized:
        try:
            check_weight_groups(tuple(root.get_submodule(n).weight.shape), spec.scheme.w_group)
        except VlmquantError as e:
            raise VlmquantError(f"{n}: {e}") from None
    applied, skipped = [], []
    if cache is not None and not isinstance(cache, dict):
        raise VlmquantError(f"{source}: not a scale cache (no 'scale' list)")
    if cache is not None and spec.has_scales:  # a gptq run's cache holds its weights only
        folds = resolve_scales(root, cache.get("scale"), source, n_layers=len(adapter.layers(model)))
        applied, skipped = groups_to_fold(folds, ignored)
    stored = check_stored(cache, spec, quantized + [n for n, _ in decoder_experts(model, adapter)], source)
    result = {"quantized": quantized, "ignored": sorted(ignored), "skipped_groups": skipped,
              "applied": [(f.prev_name, f.linear_names, f.s) for f in applied], "stored": stored}
    if spec.scheme.w_type == "nvfp4" and spec.a_bit is not None:  # static input scales, calibrated in the search
        result["input_global_scales"] = input_global_scales(((cache or {}).get("meta") or {}).get("input_amax", {}),
                                                            quantized, source)
    return applied, result


def check_stored(cache, spec, weights, source):
    """The cache's GPTQ weights {name: entry} (io.scales.gptq_entry; {} for runs without GPTQ), checked: a GPTQ run's
    cache holds one for every weight to quantize (`weights`, relative to the layer root), another run's none."""
    stored = (cache or {}).get("gptq") or {}
    if stored and not spec.gptq:
        raise VlmquantError(f"{source}: holds GPTQ weights, but run uses no GPTQ; rerun its search")
    missing = [n for n in weights if n not in stored] if spec.gptq else []
    if missing:
        raise VlmquantError(f"{source}: no GPTQ weights of {missing[0]} (of {len(missing)} weights to quantize); "
                            "delete the run's scales/ and scale_cache.pt and rerun the search")
    return stored


def stored_weights(entry):
    """The QuantizedWeights of a stored GPTQ weight: one for a linear, one per expert for a fused (E, out, in) one."""
    codes, scale, zero = entry["codes"], entry["scale"], entry.get("zero_point")
    group = codes.shape[-1] // scale.shape[-1]
    if codes.dim() == 2:
        return [QuantizedWeight(codes, scale, zero, group)]
    return [QuantizedWeight(codes[e], scale[e], None if zero is None else zero[e], group) for e in range(len(codes))]


@torch.no_grad()
def write_stored(root, stored, prefix=""):
    """Overwrite the weights of `root` named in `stored` ({prefix + name: entry}, names relative to root; others are
    skipped) with their dequantized GPTQ codes: the pseudo checkpoint's weights of a GPTQ run."""
    for key, entry in stored.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        w = root.get_parameter(name if entry["codes"].dim() == 3 else f"{name}.weight")
        for e, q in enumerate(stored_weights(entry)):
            (w if w.dim() == 2 else w[e]).copy_(q.dequantize(w.dtype))


@torch.no_grad()
def fold_for_export(model, adapter, spec, cache=None, source="scale cache"):
    """Fold `cache` into `model` in place, checks first: the shared first step of every checkpoint format.

    The cache is resolved against the model once (quant.fold.resolve_scales). Scale groups whose
    linears are all ignored (spec.ignore) are skipped: their scales only serve the quantization of
    those linears. A partly ignored group is applied (to keep the fp function), so its ignored
    linears hold scaled, unquantized weights.
    Returns {"quantized", "ignored", "skipped_groups", "applied"}: decoder-linear names (relative to the
    layer root) to quantize and to keep fp, the prev names of skipped groups, the folded entries.
    """
    folds, result = resolve_export(model, adapter, spec, cache, source)
    fold(folds)
    return result


def quantize_in_memory(model, adapter, spec, cache=None, source="scale cache"):
    """fold_for_export, then fake-quantize the decoder linears to quantize: the pseudo checkpoint, in memory."""
    result = fold_for_export(model, adapter, spec, cache, source)
    pseudo_quantize(model, adapter, spec, exclude=result["ignored"])
    write_stored(layer_root(model, adapter), result["stored"])
    return result


def read_cache(spec, folder, cache_path=None, names=None):
    """(the run's scale cache or None, its source name), the cache's metadata checked against the run and its
    weights fingerprint against the model folder `folder` (io.scales.check_cache_weights)."""
    if cache_path is None:
        return None, "scale cache"
    cache = load_cache(cache_path)
    check_cache_weights(cache_path, folder, cache)
    check_cache_meta(cache, spec, dict(names or {}), str(cache_path))
    return cache, str(cache_path)


def export_info(model, spec, result, cache=None, cache_path=None, names=None):
    """The provenance every checkpoint format records (quantization.json)."""
    names = dict(names or {})
    src = Path(model.path)
    return {
        **{k: names[k] for k in ("model", "calib", "run") if k in names},
        "method": spec.method, "w_bit": spec.w_bit, "w_group": None if spec.weight_activation else spec.w_group,
        "a_bit": spec.a_bit, "w_sym": spec.w_sym, "w_type": spec.w_type,
        # every setting that made the weights: the search's (from the cache) or the run's own
        "run_config": (cache.get("meta") or {}).get("run_config", spec.config()) if cache else spec.config(),
        "source_model": str(src),
        "source_config_sha256": sha256_file(src / "config.json"),
        "source_weights": weights_fingerprint(src),  # eval refuses the checkpoint once the folder holds other weights
        "scale_cache": str(cache_path) if cache_path else None,
        "scale_cache_sha256": sha256_file(cache_path) if cache_path else None,
        "ignore": list(spec.ignore),
        "ignored_modules": result["ignored"],
        "skipped_scale_groups": result["skipped_groups"],
    }


def load_and_fold(model, spec, cache_path=None, names=None):
    """The fp model of `model` (ModelRef) loaded, the run's scale cache checked against it and folded in.

    Returns (model, fold_for_export's result, the provenance every checkpoint format records).
    """
    cache, source = read_cache(spec, model.path, cache_path, names)
    log.info("loading %s (%s, %s)", model.path, model.dtype, model.device)
    fp = model.load()
    result = fold_for_export(fp, model.adapter, spec, cache, source)
    log_result(result)
    return fp, result, export_info(model, spec, result, cache, cache_path, names)


def log_result(result):
    log.info("%d decoder linears to quantize, %d ignored, %d scale groups skipped",
             len(result["quantized"]), len(result["ignored"]), len(result["skipped_groups"]))


class StreamedExport:
    """The streamed form of load_and_fold: a models.stream.StreamedModel whose decoder layers are loaded, folded and
    quantized one at a time (`layer(i)`, then `sm.drop(i)`); every check runs on the whole model (meta device)
    first. quantize(layer, index, linears, experts): turns the layer's linears to quantize (names relative to it)
    and its fused expert weights [(name, parameter)] (folded, as load_and_fold leaves them) into what is saved."""

    def __init__(self, model, spec, cache_path=None, names=None):
        cache, self.source = read_cache(spec, model.path, cache_path, names)
        self.sm = StreamedModel(model)
        self.sm.shell  # loaded first: it gives the skeleton transformers' key mapping of the folder
        self.adapter, self.spec = model.adapter, spec
        _, self.result = resolve_export(self.sm.skeleton, model.adapter, spec, cache, self.source)
        log_result(self.result)
        self.info = export_info(model, spec, self.result, cache, cache_path, names)
        self.entries = {}  # layer index → its scale groups; resolved again on the loaded layer (new parameters)
        for entry in self.result["applied"]:
            self.entries.setdefault(int(entry[0].split(".")[1]), []).append(entry)
        self.quantized = set(self.result["quantized"])

    @torch.no_grad()
    def layer(self, i, quantize):
        layer = self.sm.layer(i)
        fold(resolve_scales(layer_root(self.sm.skeleton, self.adapter), self.entries.get(i, []), self.source))
        names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and f"layers.{i}.{n}" in self.quantized]
        quantize(layer, i, names, layer_experts(layer, self.adapter))
        return layer

    def write(self, folder, quantize, max_shard_size):
        """config.json, generation_config.json and the weight shards of the quantized model into `folder`."""
        sm = self.sm
        config_files(sm.skeleton.config, sm.shell.generation_config if sm.shell.can_generate() else None, sm.dtype,
                     type(sm.skeleton).__name__, folder)
        return write_streamed(folder, sm.skeleton, self.adapter.layers_path, sm.shell.state_dict(),
                              lambda i: self.layer(i, quantize), sm.drop, max_shard_size)


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


def check_complete(folder, out_dir, processor=True):
    """Before a checkpoint folder is renamed into place: it has the tokenizer, processor and chat template (unless
    not `processor`: a folder of an in-memory model), and no shard holds a NaN or Inf (it would be served with
    exit 0). One line naming the file under its final name `out_dir`; atomic_dir then removes the folder."""
    if processor:
        check_processor_files(folder, out_dir)
    for shard in shard_files(folder):
        bad = nonfinite_counts(Path(folder) / shard)
        if bad:
            raise nonfinite_error(Path(out_dir) / shard, bad)


def save_scales(path, applied):
    out = {f"scale.{k}": s.float() for k, (_, _, s) in enumerate(applied)}
    tensors.save(path, out, {"groups": [[prev, list(linears)] for prev, linears, _ in applied]})


def load_scales(folder):
    """The scale entries folded into a checkpoint: [(prev, (linears…), s)], [] for RTN."""
    path = Path(folder) / SCALES_FILE
    if not path.is_file():
        return []
    t, meta = tensors.load(path, "checkpoint scales file")
    return [(prev, tuple(linears), t[f"scale.{k}"]) for k, (prev, linears) in enumerate(meta["groups"])]


def read_quant_info(folder):
    path = Path(folder) / QUANT_FILE
    if not path.is_file():
        raise VlmquantError(f"{folder}: no {QUANT_FILE} (not a complete vlmquant checkpoint; rerun the export)")
    return json.loads(path.read_text())


def runtime_activations(folder):
    """(scheme, ignored module names, static input scales) with which a model folder's decoder-linear inputs are
    fake-quantized at run time (quant.model.quantized_activations): its quantization.json `scheme`,
    `ignored_modules` and (NVFP4 W4A4) `input_global_scales`, else None; for a folder without quantization.json (an
    fp model), (None, (), None). Weight-only schemes quantize no activation."""
    if not (Path(folder) / QUANT_FILE).is_file():
        return None, (), None
    info = read_quant_info(folder)
    if "scheme" not in info:
        raise VlmquantError(f"{folder}/{QUANT_FILE}: no 'scheme' (written by an older vlmquant; rerun the export)")
    return Scheme(**info["scheme"]), tuple(info.get("ignored_modules", ())), info.get("input_global_scales")


def remove_stale_temps(out_dir):
    """Temporary folders left by killed exports of the same output (never complete, never used)."""
    out_dir = Path(out_dir)
    for tmp in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
        if tmp.is_dir():
            log.info("removing %s, left by an interrupted export", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def pseudo_info(model, spec, result, info):
    scheme = spec.scheme
    return {
        "format": FORMAT, "version": 1, **info,
        "scheme": asdict(scheme),
        "quantizer": (f"weights {scheme.w_type} {scheme.w_bit}-bit {'symmetric' if scheme.symmetric else 'asymmetric'}"
                      f" ({'per output channel' if scheme.w_group <= 0 else f'groups of {scheme.w_group}'})"
                      + (f"; activations {scheme.a_type} {scheme.a_bit}-bit per token at every quantized linear's "
                         "and fused expert's inputs, applied at run time (vlmquant.quant.model.quantized_activations)"
                         if scheme.a_bit else "") + "; weights stored dequantized, in the model dtype"),
        "dtype": str(model.dtype).removeprefix("torch."),
        "n_quantized": len(result["quantized"]),
        **({"input_global_scales": result["input_global_scales"]} if "input_global_scales" in result else {}),
        "modules_relative_to": model.adapter.layers_path.rsplit(".", 1)[0],
        "packages": package_versions(),
    }


def pseudo_model(model, spec, cache_path=None, names=None):
    """The pseudo checkpoint's model, in memory: the fp model of `model` (ModelRef) loaded whole, the run's scale cache
    folded in and the decoder linears fake-quantized (GPTQ runs: their stored weights). Returns (model,
    fold_for_export's result, the quantization.json dict)."""
    fp, result, info = load_and_fold(model, spec, cache_path, names)
    pseudo_quantize(fp, model.adapter, spec, exclude=result["ignored"])
    write_stored(layer_root(fp, model.adapter), result["stored"])
    return fp, result, pseudo_info(model, spec, result, info)


def streamed_pseudo(model, spec, cache_path=None, names=None):
    """The streamed form of pseudo_model: (a StreamedExport, its `quantize` of the pseudo checkpoint, the
    quantization.json dict). job.layer(i, quantize) is decoder layer i of the pseudo checkpoint on the device (free
    it with job.sm.drop(i))."""
    job = StreamedExport(model, spec, cache_path, names)
    check_experts(decoder_experts(job.sm.skeleton, model.adapter), spec)

    def quantize(layer, i, linears, experts):
        quantize_linears([(n, layer.get_submodule(n)) for n in linears] + experts, spec)
        write_stored(layer, job.result["stored"], f"layers.{i}.")

    return job, quantize, pseudo_info(model, spec, job.result, job.info)


def export_checkpoint(model, spec, out_dir, cache_path=None, max_shard_size="5GB", names=None):
    """fp model (ModelRef) + scale cache (none for RTN) → pseudo-quantized HF folder at `out_dir`.

    spec: the run's RunSpec (its ignore: export.ignore); names: {"model", "calib", "run"}. Streamed
    (model.stream: models.memory.use_streaming), decoder layers are loaded, folded, quantized and written one at a
    time (streamed_pseudo); resident, the whole model is loaded (pseudo_model) and saved with save_pretrained. Both
    write the same bytes, the weights eval.run.run_eval measures in memory.
    """
    streamed = use_streaming(model.stream, model)
    if streamed:
        job, quantize, info = streamed_pseudo(model, spec, cache_path, names)
        result = job.result
    else:
        fp, result, info = pseudo_model(model, spec, cache_path, names)
    src = Path(model.path)
    remove_stale_temps(out_dir)
    with atomic_dir(out_dir) as tmp:
        if streamed:
            job.write(tmp, quantize, max_shard_size)
        else:
            fp.save_pretrained(tmp, max_shard_size=shard_bytes(max_shard_size))
        for shard in shard_files(tmp):
            set_safetensors_metadata(tmp / shard, {"vlmquant": dumps(info)})
        copy_processor_files(src, tmp)
        if result["applied"]:
            save_scales(tmp / SCALES_FILE, result["applied"])
        (tmp / QUANT_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        check_complete(tmp, out_dir)
    return info
