"""GPTQ rounding of one decoder layer in the search job (runs with `spec.gptq`: method gptq, or awq/mbq with
`gptq: true`).

After the layer's scales are searched and folded (none for method gptq), one forward of the layer over the search
inputs, with hooks, accumulates the Hessian of every quantized weight's input (search.hessian) over the tokens of
MBQ's loss (valid caption and vision tokens; `hessian: modality` weights the vision ones by the layer's ρ of the
weight's site, attn or mlp, as the MBQ loss does). Each weight is then rounded with search.gptq, and its dequantized
value written into the layer, so a forward of the layer afterwards is the exported model's. Linears that share one
input (q/k/v, gate/up) share one Hessian. Fused mixture-of-experts weights get one Hessian per expert from the
tokens routed to it (gate_up: the block's input; down: act(gate)·up of the expert); an expert (or linear) with fewer
than MIN_TOKENS such tokens is rounded to nearest, and its record says so. The linears export keeps fp
(`export.ignore`, the adapter's keep_fp) are not rounded.

The search inputs are the fp layer inputs (`gptq_inputs: fp`) or those the already-rounded layers compute
(`quantized`, as GPTQ and llm-compressor do): then the layer's next input is its output after rounding, and a
run's search chunks form a chain (spec.chained).
"""
import logging
from dataclasses import dataclass

import torch

from vlmquant.errors import VlmquantError
from vlmquant.models.capture import layer_forward
from vlmquant.models.stream import forward_micro_batched, split_kwargs
from vlmquant.quant.codes import quantize_weight
from vlmquant.quant.model import layer_experts
from vlmquant.search.experts import down_inputs, sort_pairs
from vlmquant.search.gptq import GPTQResult, gptq
from vlmquant.search.grid import loss_tokens
from vlmquant.search.hessian import Hessian
from vlmquant.search.layer import fold_searched

log = logging.getLogger(__name__)

MIN_TOKENS = 16  # fewer calibration tokens than this (an expert few tokens are routed to): round to nearest


@dataclass
class Rounded:
    """One quantized weight of a layer after GPTQ. name: relative to the layer; results: GPTQResults, one (a
    linear) or one per expert (a fused (E, out, in) weight); tokens, error, rtn_error: per result, the calibration
    tokens of its Hessian and the output error Σ_t w_t ||(W - Ŵ) x_t||² / (Σ_t w_t · out) of the GPTQ and of the
    round-to-nearest weight (nan without tokens); ratio: ρ of a modality Hessian, None for uniform; fused: a fused
    expert weight."""
    name: str
    results: list
    tokens: list
    error: list
    rtn_error: list
    ratio: float | None
    fused: bool = False


def weight_sites(plan):
    """{weight name: "attn" | "mlp"} from the layer's scale groups (applied and skipped)."""
    out = {}
    for g in [*plan.groups, *(g for g, _ in plan.skipped)]:
        for n in (*g.linears, g.prev):
            out.setdefault(n, g.site)
    return out


def site_of(name, sites):
    return sites.get(name) or ("attn" if "attn" in name or "attention" in name else "mlp")


def output_error(w, q, h):
    """Σ_t w_t ||(w - q) x_t||² / (Σ_t w_t · out) from H: mean over rows of d H dᵀ, d = w - q (out, in)."""
    d = (w.float() - q.float())
    return float(((d @ h.to(d.device, torch.float32)) * d).sum() / w.shape[0])


class LayerHessians:
    """Hooks on a layer's quantized linears and experts modules that add each forward's inputs to their Hessians.

    linears: {name: nn.Linear}; experts: {name of the experts module: (gate_up name, down name)}; ratios: per
    weight name, ρ (modality) or None (uniform). `batch(loss, vis)` sets the masks (b, T) of the next forward.
    """

    def __init__(self, layer, linears, experts, ratios):
        self.ratios, self.hessians, self.masks, self.last = ratios, {}, None, None
        self.handles = [m.register_forward_pre_hook(self.linear_hook(n)) for n, m in linears.items()]
        for module_name, names in experts.items():
            module = layer.get_submodule(module_name)
            n_experts = module.gate_up_proj.shape[0]
            for name, w in zip(names, (module.gate_up_proj, module.down_proj)):
                self.hessians[name] = [self.new(w.shape[-1], name, w.device) for _ in range(n_experts)]
            self.handles.append(module.register_forward_pre_hook(self.experts_hook(module, *names)))

    def new(self, n_in, name, device):
        ratio = self.ratios[name]
        return Hessian(n_in, "uniform" if ratio is None else "modality", ratio, device=device)

    def batch(self, loss, vis):
        self.masks, self.last = (loss.reshape(-1), vis.reshape(-1)), None

    def flat(self, x, what):
        loss, vis = self.masks
        if x.numel() // x.shape[-1] != loss.numel():
            raise VlmquantError(f"{what}: input of shape {tuple(x.shape)} is not one row per token of the batch "
                                f"({loss.numel()} tokens); GPTQ cannot weight its rows by token")
        return x.reshape(-1, x.shape[-1]), loss, vis

    def linear_hook(self, name):
        def hook(module, args):
            x = args[0]
            if self.last is not None and self.last[0] is x and self.ratios[self.last[1]] == self.ratios[name]:
                self.hessians[name] = self.hessians[self.last[1]]  # the same input: one Hessian
                return
            self.last = (x, name)
            x, loss, vis = self.flat(x, name)
            if name not in self.hessians:
                self.hessians[name] = self.new(x.shape[-1], name, x.device)
            self.hessians[name].add(x, loss.to(x.device), vis.to(x.device))
        return hook

    def experts_hook(self, module, gate_up, down):
        def hook(m, args):
            x, top_k_index = args[0], args[1]
            x, loss, vis = self.flat(x, gate_up)
            loss, vis = loss.to(x.device), vis.to(x.device)
            for e, h in enumerate(self.hessians[gate_up]):
                h.add(x, loss & (top_k_index == e).any(dim=1), vis)
            token, _, counts, offs = sort_pairs(top_k_index, loss, len(self.hessians[down]))
            h_in = down_inputs(module, x[token], offs)  # (S, I), sorted by expert
            every, start = torch.ones(token.numel(), dtype=torch.bool, device=x.device), 0
            for e, end in enumerate(offs.tolist()):
                if end > start:
                    self.hessians[down][e].add(h_in[start:end], every[start:end], vis[token[start:end]])
                start = end
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def round_linear(w, h, spec):
    """GPTQ of one linear weight with its Hessian h (None: no token); RTN under MIN_TOKENS tokens."""
    tokens = 0 if h is None else h.n_tokens
    rtn = quantize_weight(w, spec.scheme)
    if tokens < MIN_TOKENS:
        result, error, rtn_error = GPTQResult(rtn, rtn=True), float("nan"), float("nan")
        if tokens:
            error = rtn_error = output_error(w, rtn.dequantize(w.dtype), h.value())
        return result, tokens, error, rtn_error
    value = h.value()
    result = gptq(w, value, spec.scheme, spec.dampening, spec.act_order)
    return result, tokens, output_error(w, result.weight(w.dtype), value), output_error(w, rtn.dequantize(w.dtype), value)


@torch.no_grad()
def gptq_layer(layer, index, plan, results, spec, hidden, kwargs, masks, ratios=None, adapter=None, per_batch=None,
               quantized_output=False):
    """Fold the layer's searched scales (`results` per plan group; none for method gptq), GPTQ-round every weight
    export quantizes, write the rounded weights into `layer`. Returns ([Rounded], output): the layer's output on
    `hidden` (B, T, C) after rounding when `quantized_output`, else before (the scaled fp layer's).

    masks: {"valid", "cap", "vis"} (B, T); ratios: {"attn": ρ, "mlp": ρ} (needed for hessian modality); per_batch:
    samples per forward (None: all). Raises VlmquantError (one line naming the layer) on a Hessian GPTQ cannot use.
    """
    linears = fold_searched(layer, index, plan.groups, results, spec, adapter)[0]
    linears = dict(linears)  # {name relative to the layer: module}
    experts = {}  # the layer's fused experts modules (quant.model.check_gated_experts: gate_up_proj, down_proj)
    for name, _ in layer_experts(layer, adapter):
        module_name = name.rsplit(".", 1)[0]
        experts.setdefault(module_name, (f"{module_name}.gate_up_proj", f"{module_name}.down_proj"))
    sites = weight_sites(plan)
    weights = [*linears, *(n for pair in experts.values() for n in pair)]
    if spec.hessian == "modality" and ratios is None:
        raise VlmquantError(f"decoder layer {index}: hessian modality needs the reweight ratios of the gradient stage")
    ratio_of = {n: ratios[site_of(n, sites)] if spec.hessian == "modality" else None for n in weights}
    hooks = LayerHessians(layer, linears, experts, ratio_of)
    n, tokens = hidden.shape[:2]
    per_batch = n if per_batch is None else per_batch
    loss, vis = loss_tokens(masks, True).reshape(n, tokens), masks["vis"]
    out = torch.empty_like(hidden)
    try:
        for start in range(0, n, per_batch):
            stop = min(n, start + per_batch)
            hooks.batch(loss[start:stop], vis[start:stop])
            part = kwargs if stop - start == n else split_kwargs(kwargs, n, tokens, start, stop)
            out[start:stop] = layer_forward(layer, hidden[start:stop], part)
    finally:
        hooks.remove()
    rounded = []
    for name in weights:
        where = f"decoder layer {index} {name}"
        try:
            if name in linears:
                w = linears[name].weight
                result, count, error, rtn_error = round_linear(w, hooks.hessians.get(name), spec)
                w.copy_(result.weight(w.dtype))
                rounded.append(Rounded(name, [result], [count], [error], [rtn_error], ratio_of[name]))
                continue
            w = layer.get_parameter(name)
            per_expert = [round_linear(w[e], h, spec) for e, h in enumerate(hooks.hessians[name])]
        except VlmquantError as e:
            raise VlmquantError(f"{where}: {e}") from None
        for e, (result, *_) in enumerate(per_expert):
            w[e].copy_(result.weight(w.dtype))
        rounded.append(Rounded(name, *map(list, zip(*per_expert)), ratio_of[name], fused=True))
    fallback = [f"{r.name}[{e}]" if r.fused else r.name for r in rounded for e, res in enumerate(r.results) if res.rtn]
    if fallback:
        log.info("decoder layer %d: %d weights (experts) with fewer than %d calibration tokens rounded to nearest: %s",
                 index, len(fallback), MIN_TOKENS, ", ".join(fallback))
    if quantized_output:
        out = forward_micro_batched(layer, hidden, kwargs, per_batch)
    return rounded, out


def rounded_tensors(rounded):
    """The layer file's tensors of GPTQ weights (io.scales.save_layer `gptq`) and their metadata list: per weight
    gptq.{name}.codes, .scale [, .zero_point] (out, in) / (out, n_groups) for a linear, stacked (E, …) for a fused
    expert weight, and per result .tokens, .error, .rtn_error, .rtn (n_results,)."""
    out, meta = {}, []
    for r in rounded:
        key, qs = f"gptq.{r.name}", [res.quantized for res in r.results]
        join = torch.stack if r.fused else (lambda ts: ts[0])
        out[f"{key}.codes"] = join([q.codes for q in qs]).cpu().contiguous()
        out[f"{key}.scale"] = join([q.scale for q in qs]).cpu().contiguous()
        if qs[0].zero_point is not None:
            out[f"{key}.zero_point"] = join([q.zero_point for q in qs]).cpu().contiguous()
        out.update({f"{key}.tokens": torch.tensor(r.tokens, dtype=torch.int64),
                    f"{key}.error": torch.tensor(r.error, dtype=torch.float32),
                    f"{key}.rtn_error": torch.tensor(r.rtn_error, dtype=torch.float32),
                    f"{key}.rtn": torch.tensor([res.rtn for res in r.results])})
        meta.append({"name": r.name, "ratio": r.ratio})
    return out, meta
