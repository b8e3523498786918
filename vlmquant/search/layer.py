"""Search all scale groups of one decoder layer on its fp inputs.

One fp forward of the layer, with hooks, records every group's input and its block's inputs and
output (for a per-expert group, what its MoE block's experts were called with: the tokens and their
routing). Each group is then searched from the layer's fp weights (groups are independent); a
token-wise block runs on only the tokens its loss reads. Under a memory cap the forwards run in sample
micro-batches and a loss sums over them (grid.block_loss); when the records do not fit the device either,
they are kept in pinned host memory and each micro-batch's are moved back for its forward. The next
layer's input is the layer's fp output, or with `distort` the layer's output as the quantized model
computes it (`quantized_forward`).
"""
import torch

from vlmquant.errors import VlmquantError
from vlmquant.models.base import layer_part
from vlmquant.models.stream import forward_micro_batched, split_kwargs
from vlmquant.quant.fold import fold, resolve_scales
from vlmquant.quant.model import groups_to_fold, layer_experts, quantize_linears, quantized_inputs, resolve_ignore
from vlmquant.models.capture import layer_forward
from vlmquant.search.experts import experts_job
from vlmquant.search.grid import GroupSearch, loss_tokens


def fill_rows(whole, part, start, stop, n, host=False):
    """(whole, the view of `part` in it): the rows of samples start:stop out of n written into `whole` (allocated on
    first use; with `host`, in host memory). Rows per sample: 1 for (b, T, C) inputs, T for token-flattened (b·T, C)
    ones (MoE experts)."""
    k = part.shape[0] // (stop - start)
    if whole is None:
        whole = torch.empty((n * k, *part.shape[1:]), dtype=part.dtype, device="cpu" if host else part.device,
                            pin_memory=host and part.is_cuda)
    whole[start * k:stop * k] = part
    return whole, whole[start * k:stop * k]


def stored(t, host):
    """A recorded tensor as kept: `t` itself, or with `host` a copy in host memory (pinned when `t` is on a GPU);
    anything but a tensor as it is."""
    if not host or not isinstance(t, torch.Tensor) or t.device.type == "cpu":
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda).copy_(t)


def on_device(t, device):
    """A recorded tensor (anything else as it is) on `device`: copied without blocking the host (from pinned memory
    the copy is ordered on the current stream)."""
    return t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t


@torch.no_grad()
def record_layer(layer, groups, hidden, kwargs, per_batch=None, host=False):
    """fp forward with hooks → (next hidden, {group index: {"x": group input, "parts": [part]}}).

    One part per sample micro-batch of `per_batch` samples (None: one part, all samples): the block's "args",
    "kwargs", fp "out" and "span" (start, stop); a per-expert group's part "args" are its experts module's
    (hidden (N, H), top_k_index, weights) (`expert_args` joins them). x holds every sample (the channel
    statistics); a block's input that is x is kept as a view into it. host: x, the args and the fp outputs are
    kept in host memory (`stored`); the keyword arguments (position embeddings, masks) stay on the device.
    """
    n, tokens = hidden.shape[:2]
    per_batch = n if per_batch is None else per_batch
    records = {gi: {"x": None, "parts": []} for gi in range(len(groups))}
    current, handles = {}, []
    for gi, g in enumerate(groups):
        def input_hook(module, args, gi=gi):
            current.setdefault(gi, {}).update(x=args[0], args=args)

        def block_hook(module, args, kwargs, output, gi=gi):
            current.setdefault(gi, {}).update(args=args, kwargs=kwargs,
                                              out=output[0] if isinstance(output, tuple) else output)

        handles.append(layer.get_submodule(g.inputs or g.linears[0]).register_forward_pre_hook(input_hook))
        if not g.experts:
            handles.append(layer.get_submodule(g.block).register_forward_hook(block_hook, with_kwargs=True))
    out = None
    try:
        for start in range(0, n, per_batch):
            stop = min(n, start + per_batch)
            whole = stop - start == n
            part = layer_forward(layer, hidden if whole else hidden[start:stop],
                                 kwargs if whole else split_kwargs(kwargs, n, tokens, start, stop))
            if whole:
                out = part
            else:
                out = hidden.new_empty(hidden.shape) if out is None else out
                out[start:stop] = part
            for gi, rec in records.items():
                cur = current.pop(gi)
                x, args = cur["x"], cur["args"]
                if whole:
                    rec["x"] = view = stored(x, host)
                else:
                    rec["x"], view = fill_rows(rec["x"], x, start, stop, n, host)
                args = tuple(view if a is x else stored(a, host) for a in args)
                rec["parts"].append({"args": args, "kwargs": cur.get("kwargs"), "out": stored(cur.get("out"), host),
                                     "span": (start, stop)})
    finally:
        for h in handles:
            h.remove()
    return out, records


def expert_args(rec):
    """A per-expert group's experts-module args over every sample: (hidden (N, H), top_k_index, weights)."""
    parts = [p["args"] for p in rec["parts"]]
    if len(parts) == 1:
        return parts[0]
    return (rec["x"], *(torch.cat([a[j] for a in parts]) for j in range(1, len(parts[0]))))


def select_tokens(args, out, masks, reweight):
    """A token-wise block's inputs and fp output, flattened to (1, N_keep, C), and the masks (N_keep,), at only
    the tokens its loss reads. Unchanged when that is every token or none (group_loss then says why)."""
    keep = loss_tokens(masks, reweight).to(out.device)
    n = int(keep.sum())
    if n in (0, keep.numel()):
        return args, out, masks
    idx = keep.nonzero().squeeze(1)

    def pick(t):  # (1, N_keep, C): MoE blocks take 3-D; host records stay pinned
        t_keep = t.reshape(-1, t.shape[-1]).index_select(0, idx)[None]
        return t_keep.pin_memory() if t.is_pinned() else t_keep
    return (pick(args[0]), *args[1:]), pick(out), {k: v.reshape(-1).to(idx.device)[idx] for k, v in masks.items()}


def group_period(layer, g, n_in):
    """The period of the group's scales: a norm's width where its weight is shared by every head of a wider
    input (Qwen3.5's gated norm in linear attention), else None."""
    prev = layer_part(layer, g.prev)
    if isinstance(prev, (torch.Tensor, torch.nn.Linear)):
        return None
    d = prev.weight.numel()
    return d if d < n_in else None


def search_layer(layer, groups, hidden, kwargs, masks, spec, ratios=None, per_batch=None, host=False):
    """Search every group of `layer` with the run's method. Returns (results per group, fp output of the layer).

    spec: the RunSpec. ratios: {"attn": ρ, "mlp": ρ} when reweighting, else None. A per-expert group's result
    is an ExpertsResult (its method's `experts` search), the others' a GroupResult. per_batch: samples per
    micro-batch of the layer's forwards (None: all at once); the losses are over all samples either way.
    host: the groups' records are kept in host memory (record_layer), each moved to the layer's device when used.
    """
    device = hidden.device
    out, records = record_layer(layer, groups, hidden, kwargs, per_batch, host)
    results = []
    for gi, g in enumerate(groups):
        rec = records.pop(gi)
        ratio = ratios[g.site] if ratios else None
        if g.experts:
            if spec.method_def.experts is None:
                raise VlmquantError(f"method {spec.method} does not search the experts of mixture-of-experts layers")
            hidden_in, top_k_index = (on_device(t, device) for t in expert_args(rec)[:2])
            job = experts_job(layer.get_submodule(g.block), hidden_in, top_k_index, masks, ratio is not None)
            results.append(spec.method_def.experts(job, spec, ratio))
            del job, rec, hidden_in, top_k_index
            continue
        block = layer.get_submodule(g.block)
        forwards, fp_outs, loss_masks = [], [], []
        for part in rec.pop("parts"):
            start, stop = part["span"]
            part_masks = masks if stop - start == hidden.shape[0] else {k: v[start:stop] for k, v in masks.items()}
            args, fp_out = part["args"], part["out"]
            if g.token_wise:
                args, fp_out, part_masks = select_tokens(args, fp_out, part_masks, ratio is not None)

            def forward(block=block, args=args, kwargs=part["kwargs"]):
                o = block(*(on_device(a, device) for a in args), **kwargs)
                return o[0] if isinstance(o, tuple) else o

            forwards.append(forward)
            fp_outs.append(fp_out)
            loss_masks.append(part_masks)
            del part, args, fp_out
        if len(forwards) == 1:
            forwards, fp_outs, loss_masks = forwards[0], fp_outs[0], loss_masks[0]
        # rec["x"] stays whole: the channel statistics (a, max|X|) are over every valid token
        job = GroupSearch(rec["x"], [layer_part(layer, n) for n in g.linears], forwards, fp_outs, loss_masks, masks,
                          group_period(layer, g, rec["x"].shape[-1]))
        results.append(spec.method_def.group(job, spec, ratio))
        del job, forwards, fp_outs, loss_masks, rec
    return results, out


def quantized_parts(layer, adapter, prefix, ignore):
    """(linears to quantize, names of the ignored ones, fused expert weights to quantize) of one decoder layer as
    export quantizes it: adapter.keep_fp linears are never quantized, `ignore` patterns (export.ignore) keep
    linears fp. Names relative to the layer; prefix: the layer's name relative to the layer root."""
    keep = set(adapter.keep_fp) if adapter else set()
    named = [(n, m) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and n not in keep]
    ignored = {n.removeprefix(prefix) for n in resolve_ignore([prefix + n for n, _ in named], ignore, strict=False)}
    return [m for n, m in named if n not in ignored], ignored, [w for _, w in layer_experts(layer, adapter)]


@torch.no_grad()
def quantized_forward(layer, index, groups, results, spec, hidden, kwargs, adapter=None, per_batch=None):
    """Decoder layer `index`'s output as the exported model computes it: the searched scales folded, every
    linear fake-quantized (inputs too for weight-activation runs) and, with the family's `adapter`, its fused
    expert weights per expert. As in export, the linears spec.ignore selects (and adapter.keep_fp) stay fp and
    a group whose linears are all ignored is not folded. Changes `layer`. per_batch: samples per micro-batch
    (None: all at once)."""
    linears, ignored, experts = quantized_parts(layer, adapter, f"layers.{index}.", spec.ignore)
    folds = resolve_scales(layer, [(g.prev, g.consumers, r.scales) for g, r in zip(groups, results)], "search")
    fold(groups_to_fold(folds, ignored)[0])
    quantize_linears(linears + experts, spec)
    with quantized_inputs(linears, spec.scheme):
        return forward_micro_batched(layer, hidden, kwargs, hidden.shape[0] if per_batch is None else per_batch)
