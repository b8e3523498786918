"""Eval stages: the fp reference (once per model and eval set) and the eval of a run's weights against it: made in
memory from the fp model and the scale cache as export writes them (RunWeights: the workflow's), or read from a pseudo
checkpoint folder; the same weights give the same table.

fp reference, `fp.safetensors` (small: nothing of size sequence × vocabulary):
  cap.sample, cap.pos, cap.target (N,)   caption prediction positions, in sample order
  cap.topk_idx (int32), cap.topk_logp (N, k)  fp top-k next-token log-probs (k = eval.kl_top_k or the vocabulary)
  cap.rest_logp (N,)                     log of the fp probability outside the top-k (−inf when k = vocabulary)
  hid.sample, hid.pos, hid.vision (M,)   positions where decoder-layer outputs are compared
  hid.layer_NNN (M, C)                   fp output of decoder layer NNN there (model dtype)
  metadata `vlmquant`: settings, inputs sha256, model path, n_layers, vocabulary size, packages

Tables (`fp.parquet`, `eval.parquet`), long format, one metric value per row:
  model, calib, run, eval_calib, metric, layer (null: whole model), modality, value
  metrics: n_samples, n_caption_tokens, caption_nll, caption_ppl, kl, top1_agreement (modality
  caption); hidden_rel_mse per layer (modality vision / text); weight_rel_err and
  weight_rel_err_scaled per layer (modality null). See vlmquant/eval/metrics.py for definitions.
  Schema metadata `vlmquant`: provenance (settings, hashes, quantization info, packages).
"""
import contextlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

from vlmquant.data.overlap import check_eval_parquets
from vlmquant.errors import VlmquantError
from vlmquant.eval.table import write_table
from vlmquant.eval.metrics import (ErrorSums, caption_positions, kl_topk, rest_logmass, select_positions,
                                   weight_error, weight_scale_factors)
from vlmquant.export.checkpoint import load_scales, pseudo_model, read_quant_info, streamed_pseudo
from vlmquant.io import ragged, tensors
from vlmquant.io.provenance import check_weights, package_versions, sha256_file, weights_fingerprint
from vlmquant.models.loading import Checkpoint
from vlmquant.models.memory import use_streaming
from vlmquant.models.stream import StreamedModel
from vlmquant.quant.model import expert_modules, never_quantized, quantized_activations, quantized_inputs
from vlmquant.quant.scheme import Scheme
from vlmquant.models.capture import layer_forward, load_samples, model_inputs, token_masks

log = logging.getLogger(__name__)

SETTINGS = ("batch_size", "kl_top_k", "hidden_positions")


# --- forward ---------------------------------------------------------------------------------
def hidden_selection(samples, per_modality):
    """Per sample: (positions, is_vision) where decoder-layer outputs are compared."""
    return [select_positions(m["valid"][0], m["vis"][0], per_modality) for m in map(token_masks, samples)]


def batch_positions(samples, selection, ids, device):
    """(collated batch, rows, cols) of the samples `ids`: where their layer outputs are compared."""
    batch = ragged.collate([samples[i] for i in ids])
    rows = torch.cat([torch.full_like(selection[i][0], b) for b, i in enumerate(ids)]).to(device)
    cols = torch.cat([selection[i][0] for i in ids]).to(device)
    return batch, rows, cols


def batch_result(ids, labels, hidden, head, selection, rows, cols, captured):
    """The dict forward_batches yields, from the final (normed) hidden states (B, T, C) of a batch."""
    r, c, target = caption_positions(labels.to(hidden.device))
    logp = F.log_softmax(head(hidden[r, c]).float(), dim=-1)  # (N, V)
    return {"cap_sample": torch.tensor(ids)[r.cpu()], "cap_pos": c.cpu(), "target": target.cpu(), "logp": logp,
            "hid_sample": torch.tensor(ids)[rows.cpu()], "hid_pos": cols.cpu(),
            "hid_vision": torch.cat([selection[i][1] for i in ids]), "hidden": captured}


def batch_ids(n, batch_size):
    return [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]


@torch.no_grad()
def forward_batches(model, adapter, samples, selection, batch_size, device, dtype):
    """Run the eval set through the whole model; per batch yield caption positions, their next-token log-probs
    and layer outputs.

    Yields dicts: cap_sample, cap_pos, target (N,), logp (N, V) float32,
    hid_sample, hid_pos, hid_vision (M,), hidden {layer: (M, C)}.
    Logits are computed only at caption positions (never batch × sequence × vocabulary).
    """
    layers = adapter.layers(model)
    trunk = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    for ids in tqdm(batch_ids(len(samples), batch_size), desc="eval", unit="batch"):
        batch, rows, cols = batch_positions(samples, selection, ids, device)
        captured = {}

        def hook(module, args, output, i=None):
            out = output[0] if isinstance(output, tuple) else output  # (B, T, C)
            captured[i] = out[rows, cols].detach()

        handles = [layer.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i)) for i, layer in enumerate(layers)]
        try:
            hidden = trunk(**model_inputs(batch, device, dtype), use_cache=False).last_hidden_state  # (B, T, C)
        finally:
            for h in handles:
                h.remove()
        yield batch_result(ids, batch["labels"], hidden, head, selection, rows, cols, captured)


@torch.no_grad()
def streamed_batches(sm, samples, selection, batch_size, scheme=None, exclude=(), on_layer=None, input_scales=None,
                     load_layer=None):
    """forward_batches layer-major over a models.stream.StreamedModel: every batch goes through decoder layer i,
    then the layer is dropped; the same dicts, in the same order, once all layers have run.

    scheme, exclude: weight-activation checkpoints quantize every decoder linear's input (minus the names in
    `exclude`, relative to the layer root) and the fused experts' inputs as quant.model.quantized_activations does
    on a whole model (NVFP4 W4A4: with the static `input_scales` {name: global input scale}).
    on_layer(i, layer): called with each loaded decoder layer (the weight errors). load_layer(i): decoder layer i on
    the device (default sm.layer: as the folder holds it).
    """
    parts, exclude = [], set(exclude)
    for ids in batch_ids(len(samples), batch_size):
        batch, rows, cols = batch_positions(samples, selection, ids, sm.device)
        hidden, args = sm.capture(batch)
        parts.append({"ids": ids, "labels": batch["labels"], "rows": rows, "cols": cols, "hidden": hidden,
                      "args": args, "captured": {}})
    sm.phase("host")
    for i in tqdm(range(sm.n_layers), desc="eval", unit="layer"):
        layer = (load_layer or sm.layer)(i)
        named = [(f"layers.{i}.{n}", m) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)
                 and f"layers.{i}.{n}" not in exclude and not never_quantized(f"layers.{i}.{n}", sm.adapter)]
        scales = None if input_scales is None else [input_scales[n] for n, _ in named]
        with quantized_inputs([m for _, m in named], scheme, expert_modules(layer, sm.adapter), input_scales=scales):
            for p in parts:
                out = layer_forward(layer, p["hidden"], p["args"].kwargs(i))  # (B, T, C)
                p["captured"][i] = out[p["rows"], p["cols"]]  # the layer's output, as its forward hook sees it
                p["hidden"] = p["args"].after(i, out)
        if on_layer is not None:
            on_layer(i, layer)
        sm.drop(i)
    sm.phase("head")
    for p in parts:
        yield batch_result(p["ids"], p["labels"], sm.norm(p.pop("hidden")), sm.head, selection, p["rows"],
                           p["cols"], p["captured"])


def caption_rows(nll_sum, n_tok, kl_sum, top1, n_samples):
    nll = nll_sum / n_tok
    return [("n_samples", None, None, n_samples), ("n_caption_tokens", None, None, n_tok),
            ("caption_nll", None, "caption", nll), ("caption_ppl", None, "caption", math.exp(nll)),
            ("kl", None, "caption", kl_sum / n_tok), ("top1_agreement", None, "caption", top1 / n_tok)]


def _check_settings(settings):
    missing = [k for k in SETTINGS if k not in settings]
    if missing:
        raise VlmquantError(f"eval settings miss {', '.join(missing)}")
    if settings["batch_size"] < 1:
        raise VlmquantError("config: eval.batch_size must be at least 1")


# --- fp reference ----------------------------------------------------------------------------
def run_fp_reference(model, inputs_path, ref_path, table_path, settings, ids):
    """Evaluate the fp model (ModelRef) once: write the reference tensors and the fp row of the tables."""
    _check_settings(settings)
    adapter, device, dtype = model.adapter, model.device, model.dtype
    samples, _ = load_samples(inputs_path)
    path = model.path
    selection = hidden_selection(samples, settings["hidden_positions"])
    parts = {k: [] for k in ("cap.sample", "cap.pos", "cap.target", "cap.topk_idx", "cap.topk_logp", "cap.rest_logp",
                             "hid.sample", "hid.pos", "hid.vision")}
    hidden = {}
    nll_sum, vocab = 0.0, None
    if use_streaming(model.stream, model):
        batches = streamed_batches(StreamedModel(model), samples, selection, settings["batch_size"])
    else:
        batches = forward_batches(model.load(), adapter, samples, selection, settings["batch_size"], device, dtype)
    for out in batches:
        logp = out["logp"]
        vocab = logp.shape[1]
        if not torch.isfinite(logp).all():
            raise VlmquantError(f"{path}: non-finite fp logits on the eval set")
        k = vocab if settings["kl_top_k"] <= 0 else min(settings["kl_top_k"], vocab)
        top = logp.topk(k, dim=1)  # sorted: column 0 is the fp argmax
        nll_sum += float(-logp.gather(1, out["target"].to(logp.device)[:, None]).double().sum())
        for key, value in (("cap.sample", out["cap_sample"]), ("cap.pos", out["cap_pos"]), ("cap.target", out["target"]),
                           ("cap.topk_idx", top.indices.int().cpu()), ("cap.topk_logp", top.values.cpu()),
                           ("cap.rest_logp", rest_logmass(logp, top.indices).cpu()),
                           ("hid.sample", out["hid_sample"]), ("hid.pos", out["hid_pos"]),
                           ("hid.vision", out["hid_vision"])):
            parts[key].append(value)
        for i, h in out["hidden"].items():
            hidden.setdefault(i, []).append(h.cpu())
    ref = {k: torch.cat(v) for k, v in parts.items()}
    ref.update({f"hid.layer_{i:03d}": torch.cat(v) for i, v in hidden.items()})
    n_tok = ref["cap.target"].numel()
    if n_tok == 0:
        raise VlmquantError(f"{inputs_path}: the eval set has no caption tokens")
    provenance = {**ids, "settings": {k: settings[k] for k in SETTINGS}, "inputs_sha256": sha256_file(inputs_path),
                  "model_path": str(path), "weights": weights_fingerprint(path), "n_layers": len(hidden),
                  "vocab": vocab,
                  "n_samples": len(samples), "dtype": str(dtype).removeprefix("torch."), "packages": package_versions()}
    tensors.save(ref_path, ref, provenance)
    rows = caption_rows(nll_sum, n_tok, 0.0, n_tok, len(samples))
    write_table(rows, table_path, {**ids, "run": "fp", "calib": None}, {**provenance, "method": "fp"})


def load_reference(ref_path):
    return tensors.load(ref_path, "fp reference file")


# --- weight error ----------------------------------------------------------------------------
class WeightErrors:
    """Per decoder layer, relative Frobenius error of its linears vs the fp weights, in both bases.

    The fp weights are read tensor by tensor from the source model folder `fp_path`; `entries` are the scale
    groups folded into the checkpoint (export.checkpoint.load_scales). Feed it one decoder layer at a time.
    """

    def __init__(self, adapter, fp_path, entries):
        self.adapter, self.fp_path, self.ckpt = adapter, fp_path, Checkpoint(fp_path)
        self.prefix = self.ckpt.find_prefix(adapter.checkpoint_layer_prefixes)
        self.cols, self.rows = weight_scale_factors(entries)
        self.sums = {}

    @torch.no_grad()
    def add_layer(self, index, layer):
        """The linears of decoder layer `index` (a module holding the checkpoint's weights) but the adapter's keep_fp
        (quant.model.decoder_linears)."""
        linears = [(f"layers.{index}.{n}", m) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)
                   and not never_quantized(f"layers.{index}.{n}", self.adapter)]
        keys = {name: f"{self.prefix}.{name.removeprefix('layers.')}.weight" for name, _ in linears}
        by_file = {}
        for name, key in keys.items():
            if key not in self.ckpt.files:
                raise VlmquantError(f"{self.fp_path}: tensor {key} not found (is this the checkpoint's source model?)")
            by_file.setdefault(self.ckpt.files[key], []).append(name)
        lins = dict(linears)
        for file, names in by_file.items():
            with safe_open(self.ckpt.path / file, "pt") as f:
                for name in names:
                    w_fp, lin = f.get_tensor(keys[name]), lins[name]
                    if w_fp.shape != lin.weight.shape:
                        raise VlmquantError(f"{self.fp_path}: {keys[name]} has shape {tuple(w_fp.shape)}, the checkpoint "
                                            f"{tuple(lin.weight.shape)} (is this the checkpoint's source model?)")
                    err = weight_error(w_fp, lin.weight, self.cols.get(name), self.rows.get(name, ()))
                    self.sums[index] = [a + b for a, b in zip(self.sums.get(index, [0.0] * 4), err)]

    def table_rows(self):
        out = []
        for layer, (num, den, num_s, den_s) in sorted(self.sums.items()):  # NaN for an all-zero layer
            out.append(("weight_rel_err", layer, None, math.sqrt(num / den) if den > 0 else math.nan))
            out.append(("weight_rel_err_scaled", layer, None, math.sqrt(num_s / den_s) if den_s > 0 else math.nan))
        return out


def weight_rows(model, adapter, fp_path, entries):
    """WeightErrors of every decoder layer of a whole model: its table rows."""
    errors = WeightErrors(adapter, fp_path, entries)
    for i, layer in enumerate(tqdm(adapter.layers(model), desc="weight error", unit="layer")):
        errors.add_layer(i, layer)
    return errors.table_rows()


# --- eval of a run's weights ----------------------------------------------------------------
@dataclass(frozen=True)
class RunWeights:
    """A run's weights made in memory from the fp model and the run's scale cache (None for RTN) exactly as export
    writes its pseudo checkpoint (export.checkpoint.pseudo_model, streamed_pseudo): what run_eval measures instead of
    a written checkpoint folder. spec: the run's RunSpec; names: {"model", "calib", "run"}, checked against the
    cache's metadata as export checks them."""
    spec: object
    cache_path: str | None = None
    names: dict | None = None


def open_quantized(model, quantized, streamed):
    """(quantization.json dict, the scale entries folded into the weights, what runs them) of `quantized`: a pseudo
    checkpoint folder or RunWeights. What runs them: streamed, (models.stream.StreamedModel, its load_layer(i));
    resident, the whole model."""
    if isinstance(quantized, RunWeights):
        spec, cache, names = quantized.spec, quantized.cache_path, quantized.names
        if streamed:
            job, quantize, info = streamed_pseudo(model, spec, cache, names)
            return info, job.result["applied"], (job.sm, lambda i: job.layer(i, quantize))
        full, result, info = pseudo_model(model, spec, cache, names)
        return info, result["applied"], full
    info, entries = read_quant_info(quantized), load_scales(quantized)
    # a checkpoint made from the weights the model folder holds now (a file without the record passes)
    check_weights(info.get("source_weights"), model.path, f"{quantized}: checkpoint")
    if streamed:
        sm = StreamedModel(model, quantized)
        return info, entries, (sm, sm.layer)
    return info, entries, model.load(quantized)


@torch.no_grad()
def run_eval(model, quantized, inputs_path, ref_path, table_path, settings, ids, held_out=None, allow_overlap=False):
    """Evaluate a pseudo-quantized model of `model` (ModelRef: the fp source, its family, device, dtype and memory
    settings) against the fp reference; write its table. `quantized`: RunWeights (the run's weights made in memory,
    as export would write them) or a pseudo checkpoint folder: the same table for the same weights. Streamed
    (model.stream), the decoder layers are loaded (and quantized) one at a time; resident, the whole model at once:
    the same table.

    held_out: (eval set Parquet, search set Parquet) of a run with scales, whose names are ids["eval_calib"] and
    ids["calib"]: the eval set must share no image with the set the scales came from (data.overlap; a warning
    with `allow_overlap`, eval.allow_overlap), else VlmquantError naming both sets, before anything is read."""
    if held_out is not None:
        check_eval_parquets(ids["eval_calib"], held_out[0], ids["calib"], held_out[1], allow_overlap)
    _check_settings(settings)
    adapter, fp_path = model.adapter, model.path
    streamed = use_streaming(model.stream, model)
    quant, entries, runner = open_quantized(model, quantized, streamed)
    label = (quantized.cache_path or f"runs.{quantized.spec.name}") if isinstance(quantized, RunWeights) else quantized
    ref, ref_meta = load_reference(ref_path)
    check_weights(ref_meta.get("weights"), fp_path, f"{ref_path}: fp reference")
    inputs_sha = sha256_file(inputs_path)
    if ref_meta["inputs_sha256"] != inputs_sha:
        raise VlmquantError(f"{ref_path}: fp reference was computed on other inputs than {inputs_path}; rerun it")
    for k in SETTINGS:
        if ref_meta["settings"][k] != settings[k]:
            raise VlmquantError(f"{ref_path}: fp reference has eval.{k}={ref_meta['settings'][k]!r}, "
                                f"this eval {settings[k]!r}; rerun it")
    samples, _ = load_samples(inputs_path)
    selection = hidden_selection(samples, settings["hidden_positions"])
    # weight-activation runs: activations are quantized at run time
    scheme = Scheme(**quant["scheme"]) if quant.get("scheme") else None
    ignored = quant.get("ignored_modules", ())
    input_scales = quant.get("input_global_scales")  # NVFP4 W4A4's static ones
    weights = WeightErrors(adapter, fp_path, entries)
    if streamed:
        sm, load_layer = runner
        n_layers = sm.n_layers
        _check_depth(label, n_layers, ref_meta)
        batches = streamed_batches(sm, samples, selection, settings["batch_size"], scheme, ignored, weights.add_layer,
                                   input_scales, load_layer)
        context = contextlib.nullcontext()
    else:
        full = runner
        n_layers = len(adapter.layers(full))
        _check_depth(label, n_layers, ref_meta)
        batches = forward_batches(full, adapter, samples, selection, settings["batch_size"], model.device, model.dtype)
        context = quantized_activations(full, adapter, scheme, ignored, input_scales)
    errors = ErrorSums()
    nll_sum = kl_sum = top1 = 0.0
    n_cap = n_hid = 0
    with context:
        for out in batches:
            n, m = out["target"].numel(), out["hid_pos"].numel()
            for key, mine, span in (("cap.sample", out["cap_sample"], (n_cap, n)), ("cap.pos", out["cap_pos"], (n_cap, n)),
                                    ("hid.sample", out["hid_sample"], (n_hid, m)), ("hid.pos", out["hid_pos"], (n_hid, m))):
                if not torch.equal(ref[key][span[0]:span[0] + span[1]], mine):
                    raise VlmquantError(f"{ref_path}: the fp reference positions do not match the eval inputs; rerun it")
            logq = out["logp"]
            if not torch.isfinite(logq).all():
                raise VlmquantError(f"{label}: non-finite logits on the eval set")
            dev = logq.device
            idx = ref["cap.topk_idx"][n_cap:n_cap + n].to(dev)
            lp = ref["cap.topk_logp"][n_cap:n_cap + n].to(dev)
            nll_sum += float(-logq.gather(1, out["target"].to(dev)[:, None]).double().sum())
            rest = ref["cap.rest_logp"][n_cap:n_cap + n].to(dev)
            kl_sum += float(kl_topk(idx, lp, logq, rest).sum())
            top1 += float((logq.argmax(1) == idx[:, 0]).sum())
            vision = ref["hid.vision"][n_hid:n_hid + m].to(dev)
            for i, h in out["hidden"].items():
                h_fp = ref[f"hid.layer_{i:03d}"][n_hid:n_hid + m].to(dev)
                for modality, mask in (("vision", vision), ("text", ~vision)):
                    errors.add((i, modality), h[mask], h_fp[mask])
            n_cap, n_hid = n_cap + n, n_hid + m
    if n_cap != ref["cap.target"].numel():
        raise VlmquantError(f"{ref_path}: {ref['cap.target'].numel()} caption positions, the eval found {n_cap}; rerun it")
    if not weights.sums:  # resident: the loaded checkpoint's layers, after the forwards
        for i, layer in enumerate(tqdm(adapter.layers(full), desc="weight error", unit="layer")):
            weights.add_layer(i, layer)
    rows = caption_rows(nll_sum, n_cap, kl_sum, top1, len(samples))
    rows += [("hidden_rel_mse", i, mod, errors.relative((i, mod))) for i in range(n_layers) for mod in ("vision", "text")]
    rows += weights.table_rows()
    provenance = {**ids, "settings": {k: settings[k] for k in SETTINGS}, "inputs_sha256": inputs_sha,
                  "fp_reference_sha256": sha256_file(ref_path),
                  # in memory: the scale cache's path and sha256 and the weights' fingerprint are in `quantization`
                  "checkpoint": None if isinstance(quantized, RunWeights) else str(quantized),
                  "method": quant["method"], "w_bit": quant["w_bit"], "w_group": quant["w_group"],
                  "a_bit": quant.get("a_bit"), "quantization": {k: v for k, v in quant.items() if k != "packages"}, "packages": package_versions()}
    write_table(rows, table_path, ids, provenance)


def _check_depth(label, n_layers, ref_meta):
    if n_layers != ref_meta["n_layers"]:
        raise VlmquantError(f"{label}: {n_layers} decoder layers, the fp reference has {ref_meta['n_layers']}")
