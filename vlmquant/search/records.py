"""The records of one decoder layer's scale groups, taken in one fp forward with hooks.

For every group: its input (all samples, for the channel statistics) and, per sample micro-batch, what its
block was called with and its fp output (for a per-expert group, what its MoE block's experts were called
with: the tokens and their routing). Where they do not fit the device (models.memory.search_micro_batch) they
are kept in pinned host memory and each micro-batch's are moved back for its forward (`on_device`).
"""
import torch

from vlmquant.models.capture import layer_forward
from vlmquant.models.stream import split_kwargs


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
            current.setdefault(gi, {}).update(x=args[0], in_args=args)

        def block_hook(module, args, kwargs, gi=gi):
            current.setdefault(gi, {}).update(args=args, kwargs=kwargs)

        def out_hook(module, args, output, gi=gi):
            current[gi]["out"] = output[0] if isinstance(output, tuple) else output

        # prepended: what the modules are called with, before any other pre-hook (an input quantizer) changes it
        handles.append(layer.get_submodule(g.inputs or g.linears[0]).register_forward_pre_hook(input_hook,
                                                                                               prepend=True))
        if not g.experts:
            block = layer.get_submodule(g.block)
            handles.append(block.register_forward_pre_hook(block_hook, with_kwargs=True, prepend=True))
            handles.append(block.register_forward_hook(out_hook))
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
                x, args = cur["x"], cur.get("args", cur["in_args"])  # the block's, or a per-expert group's input
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
