"""Eval stages: the fp reference (once per model and eval set) and the eval of a checkpoint against it.

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
import logging
import math

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

from vlmquant.errors import VlmquantError
from vlmquant.eval.table import write_table
from vlmquant.eval.metrics import (ErrorSums, caption_positions, kl_topk, rest_logmass, select_positions,
                                   weight_error, weight_scale_factors)
from vlmquant.export.checkpoint import load_scales, read_quant_info
from vlmquant.io import ragged, tensors
from vlmquant.io.provenance import package_versions, sha256_file
from vlmquant.models.loading import Checkpoint
from vlmquant.quant.scheme import Scheme
from vlmquant.quant.model import decoder_linears, quantized_activations
from vlmquant.search.capture import load_samples, model_inputs

log = logging.getLogger(__name__)

SETTINGS = ("batch_size", "kl_top_k", "hidden_positions")


# --- forward ---------------------------------------------------------------------------------
def hidden_selection(samples, per_modality):
    """Per sample: (positions, is_vision) where decoder-layer outputs are compared."""
    return [select_positions(s["attention_mask"][0], s["vision_mask"][0], per_modality) for s in samples]


@torch.no_grad()
def forward_batches(model, adapter, samples, selection, batch_size, device, dtype):
    """Run the eval set; per batch yield caption positions, their next-token log-probs and layer outputs.

    Yields dicts: cap_sample, cap_pos, target (N,), logp (N, V) float32,
    hid_sample, hid_pos, hid_vision (M,), hidden {layer: (M, C)}.
    Logits are computed only at caption positions (never batch × sequence × vocabulary).
    """
    layers = adapter.layers(model)
    trunk = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    for start in tqdm(range(0, len(samples), batch_size), desc="eval", unit="batch"):
        ids = list(range(start, min(start + batch_size, len(samples))))
        batch = ragged.collate([samples[i] for i in ids])
        rows = torch.cat([torch.full_like(selection[i][0], b) for b, i in enumerate(ids)]).to(device)
        cols = torch.cat([selection[i][0] for i in ids]).to(device)
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
        r, c, target = caption_positions(batch["labels"].to(device))
        logp = F.log_softmax(head(hidden[r, c]).float(), dim=-1)  # (N, V)
        yield {"cap_sample": torch.tensor(ids)[r.cpu()], "cap_pos": c.cpu(), "target": target.cpu(), "logp": logp,
               "hid_sample": torch.tensor(ids)[rows.cpu()], "hid_pos": cols.cpu(),
               "hid_vision": torch.cat([selection[i][1] for i in ids]), "hidden": captured}


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
    path, model = model.path, model.load()
    selection = hidden_selection(samples, settings["hidden_positions"])
    parts = {k: [] for k in ("cap.sample", "cap.pos", "cap.target", "cap.topk_idx", "cap.topk_logp", "cap.rest_logp",
                             "hid.sample", "hid.pos", "hid.vision")}
    hidden = {}
    nll_sum, vocab = 0.0, None
    for out in forward_batches(model, adapter, samples, selection, settings["batch_size"], device, dtype):
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
                  "model_path": str(path), "n_layers": len(hidden), "vocab": vocab,
                  "n_samples": len(samples), "dtype": str(dtype).removeprefix("torch."), "packages": package_versions()}
    tensors.save(ref_path, ref, provenance)
    rows = caption_rows(nll_sum, n_tok, 0.0, n_tok, len(samples))
    write_table(rows, table_path, {**ids, "run": "fp", "calib": None}, {**provenance, "method": "fp"})


def load_reference(ref_path):
    return tensors.load(ref_path, "fp reference file")


# --- weight error ----------------------------------------------------------------------------
@torch.no_grad()
def weight_rows(model, adapter, fp_path, entries):
    """Per decoder layer, relative Frobenius error of its linears vs the fp weights, in both bases.

    The fp weights are read tensor by tensor from the source model folder.
    """
    ckpt = Checkpoint(fp_path)
    prefix = ckpt.find_prefix(adapter.checkpoint_layer_prefixes)
    cols, rows = weight_scale_factors(entries)
    sums = {}
    files = {}
    for name, lin in tqdm(decoder_linears(model, adapter), desc="weight error", unit="linear"):
        key = f"{prefix}.{name.removeprefix('layers.')}.weight"
        if key not in ckpt.files:
            raise VlmquantError(f"{fp_path}: tensor {key} not found (is this the checkpoint's source model?)")
        if ckpt.files[key] not in files:
            files[ckpt.files[key]] = safe_open(ckpt.path / ckpt.files[key], "pt")
        w_fp = files[ckpt.files[key]].get_tensor(key)
        if w_fp.shape != lin.weight.shape:
            raise VlmquantError(f"{fp_path}: {key} has shape {tuple(w_fp.shape)}, the checkpoint "
                                f"{tuple(lin.weight.shape)} (is this the checkpoint's source model?)")
        layer = int(name.split(".")[1])
        err = weight_error(w_fp, lin.weight.cpu(), cols.get(name), rows.get(name, ()))
        sums[layer] = [a + b for a, b in zip(sums.get(layer, [0.0] * 4), err)]
    out = []
    for layer, (num, den, num_s, den_s) in sorted(sums.items()):
        out.append(("weight_rel_err", layer, None, math.sqrt(num / den)))
        out.append(("weight_rel_err_scaled", layer, None, math.sqrt(num_s / den_s)))
    return out


# --- eval of a checkpoint --------------------------------------------------------------------
@torch.no_grad()
def run_eval(model, checkpoint, inputs_path, ref_path, table_path, settings, ids):
    """Evaluate a pseudo-quantized checkpoint of `model` (ModelRef: the fp source, its family, device and
    dtype) against the fp reference; write its table."""
    _check_settings(settings)
    adapter, device, dtype, fp_path = model.adapter, model.device, model.dtype, model.path
    quant = read_quant_info(checkpoint)
    ref, ref_meta = load_reference(ref_path)
    inputs_sha = sha256_file(inputs_path)
    if ref_meta["inputs_sha256"] != inputs_sha:
        raise VlmquantError(f"{ref_path}: fp reference was computed on other inputs than {inputs_path}; rerun it")
    for k in SETTINGS:
        if ref_meta["settings"][k] != settings[k]:
            raise VlmquantError(f"{ref_path}: fp reference has eval.{k}={ref_meta['settings'][k]!r}, "
                                f"this eval {settings[k]!r}; rerun it")
    samples, _ = load_samples(inputs_path)
    model = model.load(checkpoint)
    n_layers = len(adapter.layers(model))
    if n_layers != ref_meta["n_layers"]:
        raise VlmquantError(f"{checkpoint}: {n_layers} decoder layers, the fp reference has {ref_meta['n_layers']}")
    selection = hidden_selection(samples, settings["hidden_positions"])
    errors = ErrorSums()
    nll_sum = kl_sum = top1 = 0.0
    n_cap = n_hid = 0
    # weight-activation runs: activations are quantized at run time
    scheme = Scheme(**quant["scheme"]) if quant.get("scheme") else None
    with quantized_activations(model, adapter, scheme, quant.get("ignored_modules", ())):
        for out in forward_batches(model, adapter, samples, selection, settings["batch_size"], device, dtype):
            n, m = out["target"].numel(), out["hid_pos"].numel()
            for key, mine, span in (("cap.sample", out["cap_sample"], (n_cap, n)), ("cap.pos", out["cap_pos"], (n_cap, n)),
                                    ("hid.sample", out["hid_sample"], (n_hid, m)), ("hid.pos", out["hid_pos"], (n_hid, m))):
                if not torch.equal(ref[key][span[0]:span[0] + span[1]], mine):
                    raise VlmquantError(f"{ref_path}: the fp reference positions do not match the eval inputs; rerun it")
            logq = out["logp"]
            if not torch.isfinite(logq).all():
                raise VlmquantError(f"{checkpoint}: non-finite logits on the eval set")
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
    rows = caption_rows(nll_sum, n_cap, kl_sum, top1, len(samples))
    rows += [("hidden_rel_mse", i, mod, errors.relative((i, mod))) for i in range(n_layers) for mod in ("vision", "text")]
    rows += weight_rows(model, adapter, fp_path, load_scales(checkpoint))
    provenance = {**ids, "settings": {k: settings[k] for k in SETTINGS}, "inputs_sha256": inputs_sha,
                  "fp_reference_sha256": sha256_file(ref_path), "checkpoint": str(checkpoint),
                  "method": quant["method"], "w_bit": quant["w_bit"], "w_group": quant["w_group"],
                  "a_bit": quant.get("a_bit"), "quantization": {k: v for k, v in quant.items() if k != "packages"}, "packages": package_versions()}
    write_table(rows, table_path, ids, provenance)
