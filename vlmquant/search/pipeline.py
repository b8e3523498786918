"""Stage entry points of the search: gradients, boundary activations, layer-chunk search, merge.

Every entry point takes a ModelRef (vlmquant.models.loading.open_model) and, where it searches, the
run's RunSpec; paths come from the rules (vlmquant/paths.py).
"""
import logging
import math
from pathlib import Path

import torch
from tqdm import tqdm

from vlmquant import paths
from vlmquant.errors import VlmquantError
from vlmquant.io import ragged, scales, tensors
from vlmquant.io.provenance import package_versions, sha256_file
from vlmquant.models import n_layers
from vlmquant.models.capture import (capture_layer_inputs, load_layer_inputs, load_samples, save_layer_inputs,
                                     token_masks)
from vlmquant.models.loading import meta_model
from vlmquant.models.memory import MB, acts_micro_batch, search_micro_batch, use_streaming
from vlmquant.models.stream import StreamedModel, forward_micro_batched
from vlmquant.quant.fold import resolve_scales
from vlmquant.search.grads import SITES, gradient_stats, reweight_ratios, streamed_gradient_stats
from vlmquant.search.act_scales import input_amax, input_maxima
from vlmquant.search.gptq_layer import gptq_layer, rounded_tensors
from vlmquant.search.layer import quantized_forward, quantized_parts, search_layer, search_layer_in_order
from vlmquant.search.plan import plan_layer

log = logging.getLogger(__name__)


def check_finite(t, what):
    if not torch.isfinite(t).all():
        raise VlmquantError(f"non-finite values (NaN/Inf) in {what}")


def layer_file(folder, layer):
    return Path(folder) / paths.LAYER_FILE.format(layer=layer)


# --- grads ------------------------------------------------------------------------------------
def run_grads(model, inputs_path, out_path, batch_size=4):
    """Gradient statistics and reweight ratios of `model` (ModelRef) on the inputs → a grads file.

    Streamed (model.stream), decoder layers are loaded one at a time and the activations the backward pass
    needs are stored per layer (search.grads.streamed_gradient_stats, capped by model.grads_store_mb); resident,
    the whole model runs forward and backward per batch. Both give the same statistics.
    """
    samples, _ = load_samples(inputs_path)
    if use_streaming(model.stream, model):
        cap = None if model.grads_store_mb is None else model.grads_store_mb * MB
        stats, counts = streamed_gradient_stats(StreamedModel(model), samples, batch_size, cap)
    else:
        stats, counts = gradient_stats(model.load(), model.adapter, samples, model.device, model.dtype, batch_size)
    ratios = reweight_ratios(stats)
    out = {f"{site}.{k}": v for site, d in stats.items() for k, v in d.items()}
    out.update({f"{site}.ratio": r for site, r in ratios.items()})
    meta = {"inputs_sha256": sha256_file(inputs_path), "counts": counts, "n_samples": len(samples),
            "packages": package_versions()}
    tensors.save(out_path, out, meta)


def load_ratios(grads_path):
    """{"attn": (L,), "mlp": (L,)} reweight ratios ρ of a grads file."""
    t, _ = tensors.load(grads_path, "gradients file", keys=[f"{site}.ratio" for site in SITES])
    return {site: t[f"{site}.ratio"] for site in SITES}


# --- boundary activations -----------------------------------------------------------------------
@torch.no_grad()
def run_acts(model, inputs_path, starts, out_dir):
    """fp inputs of the decoder layers in `starts` (the first layer of each search chunk) → out_dir/layer_NNN.

    Layer-major: every sample goes through decoder layer i before layer i + 1. Streamed (model.stream auto or
    always: reading only the layers in front of the last start is never slower), each layer is loaded, run over
    the samples (in micro-batches when they do not fit memory.max_batch_mb or the free memory) and dropped;
    resident (never), the whole model is loaded once. Both write the same files.
    """
    samples, _ = load_samples(inputs_path)
    if use_streaming(model.stream, model, every_layer=False):
        sm = StreamedModel(model)
        sm.phase("inputs")
        n, tokens = len(samples), max(s["input_ids"].shape[1] for s in samples)
        per_batch = acts_micro_batch(sm, n, tokens, model.max_batch_mb)
        log.info("acts: %d of %d samples per forward", per_batch, n)
        hidden, args = sm.capture_all(samples, per_batch)
        sm.phase("host")
        get_layer, drop_layer = sm.layer, sm.drop
    else:
        full = model.load()
        layers = model.adapter.layers(full)
        hidden, args = capture_layer_inputs(full, layers, ragged.collate(samples), model.device, model.dtype,
                                            model.adapter)
        get_layer, drop_layer, per_batch = layers.__getitem__, lambda i: None, len(samples)
    meta = {"inputs_sha256": sha256_file(inputs_path)}
    for i in tqdm(range(max(starts) + 1), desc="acts", unit="layer"):
        check_finite(hidden, f"the input activations of decoder layer {i}")
        if i in starts:
            save_layer_inputs(layer_file(out_dir, i), hidden, args, {**meta, "layer": i})
        if i < max(starts):
            hidden = args.after(i, forward_micro_batched(get_layer(i), hidden, args.kwargs(i), per_batch))
            drop_layer(i)


# --- search ---------------------------------------------------------------------------------
def run_search(model, spec, inputs_path, start_dir, grads_path, layer_ids, out_dir, names):
    """Search the consecutive decoder layers `layer_ids` of `model` (ModelRef) for the run `spec`.

    Writes out_dir/layer_NNN.safetensors per layer (io.scales). start_dir holds the inputs of
    layer_ids[0]: the acts folder (fp inputs), or for a chained run's (spec.chained: distort, GPTQ on quantized
    inputs) later chunks the previous chunk's folder, whose next_inputs.safetensors are those inputs as the
    quantized model computes them (and for `distort: reference` next_fp_inputs.safetensors, as the fp model
    computes them); a chained chunk that is not the last leaves its own. GPTQ runs round every layer after its
    scales (search.gptq_layer) and store the weights in the layer files. names: {"model", "calib", "run"}.
    """
    first, last = layer_ids[0], layer_ids[-1]
    chained = spec.chained and first > 0
    in_order = spec.distort == "reference"
    start = Path(start_dir) / paths.NEXT_INPUTS if chained else layer_file(start_dir, first)
    meta = {**names, "run_config": spec.search_params()}
    samples, _ = load_samples(inputs_path)
    masks = token_masks(ragged.collate(samples), model.device)
    hidden, args = chunk_inputs(start, first, chained, names, model, spec)
    # the fp chain: layer 0's inputs are the same in both models
    hidden_fp = chunk_inputs(Path(start_dir) / paths.NEXT_FP_INPUTS, first, True, names, model, spec)[0] \
        if in_order and chained else hidden
    ratios = load_ratios(grads_path) if spec.needs_grads else None
    sm = StreamedModel(model)  # decoder layers loaded one at a time
    layers = sm.layers  # on the meta device until loaded
    plans = {}
    for i in layer_ids:  # every check before any search work
        if not 0 <= i < sm.n_layers:
            raise VlmquantError(f"{model.path}: layer {i} requested, the model has {sm.n_layers} decoder layers")
        plans[i] = plan_layer(spec, layers[i], i, model.adapter)
    per_batch, host = search_micro_batch(sm, hidden, model.max_batch_mb)
    static_acts = spec.scheme.w_type == "nvfp4" and spec.a_bit is not None
    for i in tqdm(layer_ids, desc="search", unit="layer"):
        check_finite(hidden, f"the input activations of decoder layer {i}")
        plan = plans[i]
        layer_ratios = {site: float(r[i]) for site, r in ratios.items()} if ratios else None
        layer = sm.layer(i)
        results, out, rounded, amax = [], None, None, {}
        if in_order:
            results, fp_out = search_layer_in_order(layer, plan, hidden, hidden_fp, args.kwargs(i), masks, spec,
                                                    layer_ratios, model.adapter, per_batch, host)
            hidden_fp = args.after(i, fp_out)
            del fp_out
        elif spec.has_scales:
            calibrated = quantized_parts(layer, model.adapter, f"layers.{i}.", spec.ignore)[0] if static_acts else []
            with input_maxima(calibrated, masks["valid"]) as maxima:  # NVFP4 W4A4's static input scales
                results, out = search_layer(layer, plan, hidden, args.kwargs(i), masks, spec, layer_ratios, per_batch,
                                            host)
            if static_acts:
                amax = {"input_amax": input_amax(maxima, plan.groups, results, f"layers.{i}.")}
        if spec.gptq:
            rounded, q_out = gptq_layer(layer, i, plan, results, spec, hidden, args.kwargs(i), masks, layer_ratios,
                                        model.adapter, per_batch, quantized_output=spec.chained)
            out = q_out if spec.chained or out is None else out
        elif spec.distort:
            out = quantized_forward(layer, i, plan.groups, results, spec, hidden, args.kwargs(i), model.adapter,
                                    per_batch)
        hidden = args.after(i, out)
        del layer, out
        sm.drop(i)
        for g, r in zip(plan.groups, results):
            if not all(map(math.isfinite, scales.rtn_losses(r))):
                raise VlmquantError(f"decoder layer {i} {g.prev}: the RTN loss is not finite")
        groups, skipped = (plan.groups, plan.skipped) if spec.has_scales else ([], [])
        scales.save_layer(layer_file(out_dir, i), i, groups, results,
                          [layer_ratios[g.site] if layer_ratios else None for g in groups],
                          {**meta, **amax, "skipped": [{"prev": g.prev, "linears": list(g.consumers), "reason": why}
                                               for g, why in skipped]},
                          None if rounded is None else rounded_tensors(rounded))
    if spec.chained and last + 1 < n_layers(model.path):
        check_finite(hidden, f"the quantized outputs of decoder layer {last}")
        next_meta = {"inputs_sha256": sha256_file(inputs_path), "layer": last + 1, "run": names["run"]}
        save_layer_inputs(Path(out_dir) / paths.NEXT_INPUTS, hidden, args, next_meta)
        if in_order:
            save_layer_inputs(Path(out_dir) / paths.NEXT_FP_INPUTS, hidden_fp, args, next_meta)


def chunk_inputs(path, first, chained, names, model, spec):
    """(hidden, LayerArgs) of a search chunk's first layer `first` from `path`: an acts file or, chained, a file
    the run's previous chunk left (checked to be this run's)."""
    hidden, args, info = load_layer_inputs(path, model.device, model.dtype)
    if info["layer"] != first:
        raise VlmquantError(f"{path}: holds the inputs of layer {info['layer']}, expected {first}")
    if chained and info.get("run") != names["run"]:
        kind = "distort" if spec.distort else "GPTQ"
        raise VlmquantError(f"{path}: holds another run's layer inputs; {kind} run {names['run']!r} "
                            "needs those its previous chunk left")
    return hidden, args


# --- import ----------------------------------------------------------------------------------
def decoder_relative(name, prefixes):
    """`name` relative to the decoder-layer stack (layers.{i}.…): as it is, or without one of `prefixes`."""
    if name.startswith("layers."):
        return name
    for p in sorted(prefixes, key=len, reverse=True):
        if name.startswith(p + "layers."):
            return name[len(p):]
    return None


def run_import(model, spec, src, out_path, names):
    """A scale cache made elsewhere → this run's scale cache, checked against `model` (ModelRef).

    src: {"scale": [(prev_op, (linears…), scales), …]} saved with torch.save, as this project writes it
    or as the MBQ reference's run_mbq does; names relative to the decoder-layer stack (layers.{i}.…) or
    prefixed with the model's path to it (model.layers., model.language_model.layers., …). Every entry must
    resolve to this model's decoder modules with matching widths and finite positive scales
    (quant.fold.resolve_scales on the model built on the meta device); a mismatch is one line naming the
    entry. Weight clipping (a non-empty "clip" list) is not supported and refused.
    """
    cache = scales.load_cache(src)
    where = str(src)
    if not isinstance(cache, dict) or not isinstance(cache.get("scale"), (list, tuple)):
        raise VlmquantError(f"{where}: not a scale cache (no 'scale' list)")
    if cache.get("clip"):
        raise VlmquantError(f"{where}: has weight-clipping entries ('clip'), which vlmquant does not apply")
    root_path = model.adapter.layers_path.rsplit(".", 1)[0]
    prefixes = {root_path + "."} | {p.rsplit(".", 1)[0] + "." for p in model.adapter.checkpoint_layer_prefixes}
    entries = []
    for k, entry in enumerate(cache["scale"]):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise VlmquantError(f"{where}: entry {k} is not (prev_op_name, linear names, scales)")
        prev, linears, s = entry
        fixed = [decoder_relative(n, prefixes) for n in (prev, *linears)]
        if None in fixed:
            bad = (prev, *linears)[fixed.index(None)]
            raise VlmquantError(f"{where}: entry {k}: {bad!r} is not a decoder-layer module name (layers.N.… or "
                                f"{', '.join(sorted(prefixes))}layers.N.…)")
        if not isinstance(s, torch.Tensor):
            raise VlmquantError(f"{where}: entry {k} ({prev}): scales are not a tensor")
        entries.append((fixed[0], tuple(fixed[1:]), s.detach().float().cpu().contiguous()))
    meta = meta_model(model.adapter, model.path, model.trust_remote_code)
    resolve_scales(meta.get_submodule(root_path), entries, where, n_layers=len(model.adapter.layers(meta)))
    scales.save_cache({"scale": entries, "meta": {**names, "run_config": spec.search_params(), "n_layers":
                       len(model.adapter.layers(meta)), "imported_from": where, "imported_sha256": sha256_file(src)}},
                      out_path)
