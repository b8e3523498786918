"""Search all scale groups of one decoder layer on its fp inputs.

One fp forward of the layer, with hooks, records every group's linear inputs and its
block's inputs and output. Each group is then searched from the layer's fp weights
(groups are independent); a token-wise block runs on only the tokens its loss reads. The
next layer's input is the layer's fp output, or with `distort` the layer's output as the
quantized model computes it (`quantized_forward`).
"""
import torch

from vlmquant.quant.fold import fold, resolve_scales
from vlmquant.quant.model import groups_to_fold, quantize_linears, quantized_inputs, resolve_ignore
from vlmquant.search.capture import layer_forward
from vlmquant.search.grid import GroupSearch, loss_tokens


@torch.no_grad()
def record_layer(layer, groups, hidden, kwargs):
    """fp forward with hooks → (next hidden, {group index: (x, block args, block kwargs, fp out)})."""
    records, handles = {}, []
    for gi, g in enumerate(groups):
        rec = records.setdefault(gi, {})

        def linear_hook(module, args, rec=rec):
            rec["x"] = args[0]

        def block_hook(module, args, kwargs, output, rec=rec):
            rec["args"], rec["kwargs"] = args, kwargs
            rec["out"] = output[0] if isinstance(output, tuple) else output

        handles.append(layer.get_submodule(g.linears[0]).register_forward_pre_hook(linear_hook))
        handles.append(layer.get_submodule(g.block).register_forward_hook(block_hook, with_kwargs=True))
    try:
        out = layer_forward(layer, hidden, kwargs)
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


def search_layer(layer, groups, hidden, kwargs, masks, spec, ratios=None):
    """Search every group of `layer` with the run's method. Returns (results per group, fp output of the layer).

    spec: the RunSpec. ratios: {"attn": ρ, "mlp": ρ} when reweighting, else None.
    """
    out, records = record_layer(layer, groups, hidden, kwargs)
    results = []
    for gi, g in enumerate(groups):
        rec = records.pop(gi)
        block = layer.get_submodule(g.block)
        ratio = ratios[g.site] if ratios else None
        args, fp_out, loss_masks = rec["args"], rec["out"], masks
        if g.token_wise:
            args, fp_out, loss_masks = select_tokens(args, fp_out, masks, ratio is not None)

        def forward(block=block, args=args, kwargs=rec["kwargs"]):
            o = block(*args, **kwargs)
            return o[0] if isinstance(o, tuple) else o

        # rec["x"] stays whole: the channel statistics (a, max|X|) are over every valid token
        job = GroupSearch(rec["x"], [layer.get_submodule(n) for n in g.linears], forward, fp_out, loss_masks, masks)
        results.append(spec.method_def.group(job, spec, ratio))
        del job, args, fp_out, loss_masks, rec
    return results, out


@torch.no_grad()
def quantized_forward(layer, index, groups, results, spec, hidden, kwargs):
    """Decoder layer `index`'s output as the exported model computes it: the searched scales folded, every
    linear fake-quantized (inputs too for weight-activation runs). As in export, the linears spec.ignore
    selects stay fp and a group whose linears are all ignored is not folded. Changes `layer`."""
    prefix = f"layers.{index}."
    names = [prefix + n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    ignored = {n.removeprefix(prefix) for n in resolve_ignore(names, spec.ignore, strict=False)}
    folds = resolve_scales(layer, [(g.prev, g.linears, r.scales) for g, r in zip(groups, results)], "search")
    fold(groups_to_fold(folds, ignored)[0])
    linears = [m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and n not in ignored]
    quantize_linears(linears, spec)
    with quantized_inputs(linears, spec.scheme):
        return layer_forward(layer, hidden, kwargs)
