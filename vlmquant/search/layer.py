"""Search all scale groups of one decoder layer on its fp inputs.

One fp forward of the layer, with hooks, records every group's linear inputs and its
block's inputs and output. Each group is then searched from the layer's fp weights
(groups are independent); a token-wise block runs on only the tokens its loss reads. Under a
memory cap the forwards run in sample micro-batches and a loss sums over them (grid.block_loss). The
next layer's input is the layer's fp output, or with `distort` the layer's output as the
quantized model computes it (`quantized_forward`).
"""
import torch

from vlmquant.models.stream import forward_micro_batched, split_kwargs
from vlmquant.quant.fold import fold, resolve_scales
from vlmquant.quant.model import groups_to_fold, quantize_linears, quantized_inputs, resolve_ignore
from vlmquant.search.capture import layer_forward
from vlmquant.search.grid import GroupSearch, loss_tokens


@torch.no_grad()
def record_layer(layer, groups, hidden, kwargs, per_batch=None):
    """fp forward with hooks → (next hidden, {group index: {"x": linear input, "parts": [part]}}).

    One part per sample micro-batch of `per_batch` samples (None: one part, all samples): {"args", "kwargs",
    "out"} of the group's block and "span" (start, stop). x holds every sample (the channel statistics); a
    block's input that is x is kept as a view into it.
    """
    n, tokens = hidden.shape[:2]
    per_batch = n if per_batch is None else per_batch
    records = {gi: {"x": None, "parts": []} for gi in range(len(groups))}
    current, handles = {}, []
    for gi, g in enumerate(groups):
        def linear_hook(module, args, gi=gi):
            current.setdefault(gi, {})["x"] = args[0]

        def block_hook(module, args, kwargs, output, gi=gi):
            current.setdefault(gi, {}).update(args=args, kwargs=kwargs,
                                              out=output[0] if isinstance(output, tuple) else output)

        handles.append(layer.get_submodule(g.linears[0]).register_forward_pre_hook(linear_hook))
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
                if not whole:
                    if rec["x"] is None:
                        rec["x"] = x.new_empty((n, *x.shape[1:]))
                    rec["x"][start:stop] = x
                    if args and args[0] is x:
                        args = (rec["x"][start:stop], *args[1:])
                else:
                    rec["x"] = x
                rec["parts"].append({"args": args, "kwargs": cur["kwargs"], "out": cur["out"], "span": (start, stop)})
    finally:
        for h in handles:
            h.remove()
    return out, records


def select_tokens(args, out, masks, reweight):
    """A token-wise block's inputs and fp output, flattened to (N_keep, C), and the masks (N_keep,), at only
    the tokens its loss reads. Unchanged when that is every token or none (group_loss then says why)."""
    keep = loss_tokens(masks, reweight).to(out.device)
    n = int(keep.sum())
    if n in (0, keep.numel()):
        return args, out, masks
    idx = keep.nonzero().squeeze(1)
    pick = lambda t: t.reshape(-1, t.shape[-1]).index_select(0, idx)  # noqa: E731
    return (pick(args[0]), *args[1:]), pick(out), {k: v.reshape(-1).to(idx.device)[idx] for k, v in masks.items()}


def search_layer(layer, groups, hidden, kwargs, masks, spec, ratios=None, per_batch=None):
    """Search every group of `layer` with the run's method. Returns (results per group, fp output of the layer).

    spec: the RunSpec. ratios: {"attn": ρ, "mlp": ρ} when reweighting, else None. per_batch: samples per
    micro-batch of the layer's forwards (None: all at once); the losses are over all samples either way.
    """
    out, records = record_layer(layer, groups, hidden, kwargs, per_batch)
    results = []
    for gi, g in enumerate(groups):
        rec = records.pop(gi)
        block = layer.get_submodule(g.block)
        ratio = ratios[g.site] if ratios else None
        forwards, fp_outs, loss_masks = [], [], []
        for part in rec.pop("parts"):
            start, stop = part["span"]
            part_masks = masks if stop - start == hidden.shape[0] else {k: v[start:stop] for k, v in masks.items()}
            args, fp_out = part["args"], part["out"]
            if g.token_wise:
                args, fp_out, part_masks = select_tokens(args, fp_out, part_masks, ratio is not None)

            def forward(block=block, args=args, kwargs=part["kwargs"]):
                o = block(*args, **kwargs)
                return o[0] if isinstance(o, tuple) else o

            forwards.append(forward)
            fp_outs.append(fp_out)
            loss_masks.append(part_masks)
            del part, args, fp_out
        if len(forwards) == 1:
            forwards, fp_outs, loss_masks = forwards[0], fp_outs[0], loss_masks[0]
        # rec["x"] stays whole: the channel statistics (a, max|X|) are over every valid token
        job = GroupSearch(rec["x"], [layer.get_submodule(n) for n in g.linears], forwards, fp_outs, loss_masks, masks)
        results.append(spec.method_def.group(job, spec, ratio))
        del job, forwards, fp_outs, loss_masks, rec
    return results, out


@torch.no_grad()
def quantized_forward(layer, index, groups, results, spec, hidden, kwargs, per_batch=None):
    """Decoder layer `index`'s output as the exported model computes it: the searched scales folded, every
    linear fake-quantized (inputs too for weight-activation runs). As in export, the linears spec.ignore
    selects stay fp and a group whose linears are all ignored is not folded. Changes `layer`. per_batch: samples
    per micro-batch (None: all at once)."""
    prefix = f"layers.{index}."
    names = [prefix + n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    ignored = {n.removeprefix(prefix) for n in resolve_ignore(names, spec.ignore, strict=False)}
    folds = resolve_scales(layer, [(g.prev, g.linears, r.scales) for g, r in zip(groups, results)], "search")
    fold(groups_to_fold(folds, ignored)[0])
    linears = [m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and n not in ignored]
    quantize_linears(linears, spec)
    with quantized_inputs(linears, spec.scheme):
        return forward_micro_batched(layer, hidden, kwargs, hidden.shape[0] if per_batch is None else per_batch)
