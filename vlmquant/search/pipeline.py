"""Stage entry points of the search: gradients, boundary activations, layer-chunk search, merge."""
import logging
import math

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from vlmquant.errors import VlmquantError
from vlmquant.io import ragged, scales
from vlmquant.io.atomic import atomic_path
from vlmquant.io.provenance import dumps, package_versions, sha256_file
from vlmquant.models import get_adapter
from vlmquant.models.loading import load_layers, resolve_device, resolve_dtype
from vlmquant.quant.fake import check_weight_groups
from vlmquant.search.capture import (capture_layer_inputs, layer_forward, load_layer_inputs, load_samples,
                                     save_layer_inputs, token_masks)
from vlmquant.search.grads import gradient_stats, reweight_ratios
from vlmquant.search.layer import quantized_forward, search_layer

log = logging.getLogger(__name__)


def _setup(model_cfg, device):
    device = resolve_device(device)
    return get_adapter(model_cfg["family"]), device, resolve_dtype(model_cfg.get("dtype"), device)


def _load_model(adapter, model_cfg, device, dtype):
    return adapter.load_model(model_cfg["path"], dtype, device, model_cfg.get("trust_remote_code", False))


def check_finite(t, what):
    if not torch.isfinite(t).all():
        raise VlmquantError(f"non-finite values (NaN/Inf) in {what}")


# --- grads ------------------------------------------------------------------------------------
def run_grads(model_cfg, inputs_path, out_path, device="auto", batch_size=4):
    adapter, device, dtype = _setup(model_cfg, device)
    model = _load_model(adapter, model_cfg, device, dtype)
    samples, _ = load_samples(inputs_path)
    stats, counts = gradient_stats(model, adapter, samples, device, dtype, batch_size)
    ratios = reweight_ratios(stats)
    tensors = {f"{site}.{k}": v.contiguous() for site, d in stats.items() for k, v in d.items()}
    tensors.update({f"{site}.ratio": r.contiguous() for site, r in ratios.items()})
    meta = {"inputs_sha256": sha256_file(inputs_path), "counts": counts, "n_samples": len(samples),
            "packages": package_versions()}
    with atomic_path(out_path) as tmp:
        save_file(tensors, tmp, metadata={"vlmquant": dumps(meta)})


def load_ratios(grads_path):
    with safe_open(grads_path, "pt") as f:
        return {site: f.get_tensor(f"{site}.ratio") for site in ("attn", "mlp")}


# --- boundary activations -----------------------------------------------------------------------
@torch.no_grad()
def run_acts(model_cfg, inputs_path, starts, out_paths, device="auto"):
    """fp inputs of the decoder layers in `starts` (the first layer of each search chunk)."""
    adapter, device, dtype = _setup(model_cfg, device)
    model = _load_model(adapter, model_cfg, device, dtype)
    samples, _ = load_samples(inputs_path)
    layers = adapter.layers(model)
    hidden, kwargs = capture_layer_inputs(model, layers, ragged.collate(samples), device, dtype)
    meta = {"inputs_sha256": sha256_file(inputs_path)}
    todo = dict(zip(starts, out_paths))
    for i in tqdm(range(max(starts) + 1), desc="acts", unit="layer"):
        check_finite(hidden, f"the input activations of decoder layer {i}")
        if i in todo:
            save_layer_inputs(todo[i], hidden, kwargs, {**meta, "layer": i})
        hidden = layer_forward(layers[i], hidden, kwargs)


# --- search ---------------------------------------------------------------------------------
def run_search(model_cfg, run, inputs_path, start_path, grads_path, layer_ids, out_paths, meta, device="auto",
               boundary_path=None, ignore=()):
    """Search the consecutive decoder layers `layer_ids`, writing one scale file per layer.

    start_path: the inputs of layer_ids[0] (save_layer_inputs format): fp, from the acts stage, or with
    run["distort"] the previous chunk's `boundary_path`, where a distort chunk leaves the inputs of the
    layer after its last one as the quantized model computes them. ignore: export.ignore, which distort
    runs leave fp as the exported model does.
    """
    adapter, device, dtype = _setup(model_cfg, device)
    distort = bool(run.get("distort"))
    if boundary_path is not None and not distort:
        raise VlmquantError("only distort runs pass layer inputs from one search chunk to the next")
    samples, _ = load_samples(inputs_path)
    masks = token_masks(ragged.collate(samples), device)
    hidden, kwargs, info = load_layer_inputs(start_path, device, dtype)
    if info["layer"] != layer_ids[0]:
        raise VlmquantError(f"{start_path}: holds the inputs of layer {info['layer']}, expected {layer_ids[0]}")
    if distort and layer_ids[0] > 0 and info.get("run") != meta["run"]:
        raise VlmquantError(f"{start_path}: holds fp or another run's layer inputs; distort run {meta['run']!r} "
                            "needs those its previous chunk left")
    ratios = load_ratios(grads_path) if run["reweight"] else None
    layers = load_layers(adapter, model_cfg["path"], layer_ids, device, dtype, model_cfg.get("trust_remote_code", False))
    plan = {}
    for i in layer_ids:  # every check before any search work
        groups = adapter.resolve_groups(layers[i], i)
        for g in groups:
            for name in g.linears:
                w = layers[i].get_submodule(name).weight
                try:
                    check_weight_groups(tuple(w.shape), run["w_group"])
                except VlmquantError as e:
                    raise VlmquantError(f"decoder layer {i} {name}: {e}") from None
        plan[i] = groups
    for i, path in tqdm(list(zip(layer_ids, out_paths)), desc="search", unit="layer"):
        check_finite(hidden, f"the input activations of decoder layer {i}")
        groups = plan[i]
        layer_ratios = {site: float(r[i]) for site, r in ratios.items()} if ratios else None
        layer = layers.pop(i)
        results, out = search_layer(layer, groups, hidden, kwargs, masks, run, layer_ratios)
        hidden = quantized_forward(layer, i, groups, results, run, hidden, kwargs, ignore) if distort else out
        del layer, out
        for g, r in zip(groups, results):
            if not math.isfinite(r.losses[0]):
                raise VlmquantError(f"decoder layer {i} {g.prev}: the RTN loss is not finite")
        scales.save_layer(path, i, groups, results,
                          [layer_ratios[g.ratio] if layer_ratios else None for g in groups], meta)
    if boundary_path is not None:
        check_finite(hidden, f"the quantized outputs of decoder layer {layer_ids[-1]}")
        save_layer_inputs(boundary_path, hidden, kwargs,
                          {"inputs_sha256": sha256_file(inputs_path), "layer": layer_ids[-1] + 1, "run": meta["run"]})
