"""Search all scale groups of one decoder layer.

One fp forward of the layer, with hooks, records every group's input and its block's inputs and
output (search/records.py). Each group is then searched from the layer's fp weights (groups are independent); a
token-wise block runs on only the tokens its loss reads. Under a memory cap the forwards run in sample
micro-batches and a loss sums over them (grid.block_loss); when the records do not fit the device either
(models.memory.search_micro_batch), they are kept in pinned host memory. The next
layer's input is the layer's fp output, or with `distort` the layer's output as the quantized model
computes it (`quantized_forward`).

`distort: layer` searches that way on the quantized model's inputs. `distort: reference` (the MBQ reference's
definition, docs/fidelity.md) keeps two chains, the fp model's and the quantized model's inputs of the layer
(`search_layer_in_order`): each group's target is the fp layer's output on the fp chain, and the groups are
searched in order, each on its inputs as the layer computes them from the quantized chain with the earlier
groups' scales folded and (from the second group on) every linear quantized.
"""
from contextlib import contextmanager

import torch

from vlmquant.models.base import layer_part
from vlmquant.models.stream import forward_micro_batched
from vlmquant.quant.fold import fold, resolve_scales
from vlmquant.quant.model import (expert_modules, groups_to_fold, layer_experts, quantize_linears, quantized_inputs,
                                  resolve_ignore)
from vlmquant.quant.scheme import fused_sets
from vlmquant.search.experts import experts_job
from vlmquant.search.grid import GroupSearch, loss_tokens
from vlmquant.search.records import expert_args, on_device, record_layer


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


def group_job(layer, g, rec, masks, ratio, period, device) -> GroupSearch:
    """The GroupSearch of a (not per-expert) group from its records: one forward, fp output and masks per sample
    micro-batch (masks: (B, T) of all samples); a token-wise block at only the tokens its loss reads. The
    forwards move records kept in host memory to `device`, the layer's."""
    n = masks["valid"].shape[0]
    block = layer.get_submodule(g.block)
    forwards, fp_outs, loss_masks = [], [], []
    for part in rec.pop("parts"):
        start, stop = part["span"]
        part_masks = masks if stop - start == n else {k: v[start:stop] for k, v in masks.items()}
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
    # rec["x"] stays whole: the channel statistics (a, max|X|) are over every valid token; a fused expert weight's
    # input is its experts module's
    linears = [layer_part(layer, name) for name in g.linears]
    act_modules = [layer.get_submodule(n.rsplit(".", 1)[0]) if isinstance(m, torch.Tensor) else m
                   for n, m in zip(g.linears, linears)]
    return GroupSearch(rec["x"], linears, forwards, fp_outs, loss_masks, masks, period, ratio, act_modules,
                       fused_sets(g.linears))


def search_layer(layer, plan, hidden, kwargs, masks, spec, ratios=None, per_batch=None, host=False):
    """Search every group of `layer` with the run's method. Returns (results per group, fp output of the layer).

    plan: the layer's search.plan.LayerPlan (groups, each one's search function). spec: the RunSpec. ratios:
    {"attn": ρ, "mlp": ρ} when reweighting, else None. A per-expert group's result is an ExpertsResult, the
    others' a GroupResult. per_batch: samples per micro-batch of the layer's forwards (None: all at once); the
    losses are over all samples either way. host: the groups' records are kept in host memory (record_layer),
    each moved to the layer's device when used.
    """
    out, records = record_layer(layer, plan.groups, hidden, kwargs, per_batch, host)
    results = []
    for gi, search in enumerate(plan.searches):
        rec = records.pop(gi)
        job = plan_job(layer, plan, gi, rec, masks, ratios, hidden.device)
        results.append(search(job, spec))
        del job, rec
    return results, out


def plan_job(layer, plan, gi, rec, masks, ratios, device):
    """The search job of plan group gi from its records `rec` (records.record_layer): an experts job from the
    routed inputs of a per-expert group, else a GroupSearch."""
    g = plan.groups[gi]
    ratio = ratios[g.site] if ratios else None
    if not g.experts:
        return group_job(layer, g, rec, masks, ratio, plan.periods[gi], device)
    hidden_in, top_k_index = (on_device(t, device) for t in expert_args(rec)[:2])
    return experts_job(layer.get_submodule(g.block), hidden_in, top_k_index, masks, ratio)


@contextmanager
def weights_kept(layer):
    """While inside, `layer`'s parameters may change; they are restored on exit (a copy of them on their device)."""
    saved = [(p, p.detach().clone()) for p in layer.parameters()]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)


@torch.no_grad()
def record_in_order(layer, plan, gi, results, spec, hidden_q, kwargs, adapter, per_batch, host):
    """Group gi's records on the quantized chain `hidden_q`: the layer with groups 0…gi-1's `results` folded and,
    from the second group on, every linear (and fused expert) quantized as export does, inputs too for
    weight-activation runs. The block's args and the group's input are taken before the linears' input
    quantization (records.record_layer). The layer's weights are restored."""
    if not gi:  # the fp layer
        return record_layer(layer, [plan.groups[0]], hidden_q, kwargs, per_batch, host)[1][0]
    with weights_kept(layer), quantized_layer(layer, plan.index, plan.groups[:gi], results, spec, adapter):
        return record_layer(layer, [plan.groups[gi]], hidden_q, kwargs, per_batch, host)[1][0]


def search_layer_in_order(layer, plan, hidden_q, hidden_fp, kwargs, masks, spec, ratios=None, adapter=None,
                          per_batch=None, host=False):
    """`distort: reference`: search the groups of `layer` in order. Returns (results per group, the layer's fp
    output on the fp chain `hidden_fp`).

    Group gi's target is its block's fp output on the fp chain (one fp forward records every group); its
    candidates run the block on the inputs `record_in_order` takes from the quantized chain `hidden_q`, whose
    channel statistics (a, max|X|) they use. A per-expert group's job is built from those inputs as in
    search_layer (its target is the fp experts on them). Arguments as search_layer; adapter: the family's
    (keep_fp linears, fused experts).
    """
    fp_out, fp_records = record_layer(layer, plan.groups, hidden_fp, kwargs, per_batch, host)
    targets = {gi: [part["out"] for part in r["parts"]] for gi, r in fp_records.items()}  # per micro-batch
    del fp_records
    results = []
    for gi, (g, search) in enumerate(zip(plan.groups, plan.searches)):
        rec = record_in_order(layer, plan, gi, results, spec, hidden_q, kwargs, adapter, per_batch, host)
        target = targets.pop(gi)
        if not g.experts:  # the fp chain's target
            rec["parts"] = [{**part, "out": out} for part, out in zip(rec["parts"], target)]
        job = plan_job(layer, plan, gi, rec, masks, ratios, hidden_q.device)
        results.append(search(job, spec))
        del job, rec, target
    return results, fp_out


def quantized_parts(layer, adapter, prefix, ignore):
    """([(name, linear)] to quantize, names of the ignored ones, [(name, fused expert weight)] to quantize) of one
    decoder layer as export quantizes it: adapter.keep_fp linears are never quantized, `ignore` patterns
    (export.ignore) keep linears fp. Names relative to the layer; prefix: the layer's name relative to the layer
    root."""
    keep = set(adapter.keep_fp) if adapter else set()
    named = [(n, m) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and n not in keep]
    ignored = {n.removeprefix(prefix) for n in resolve_ignore([prefix + n for n, _ in named], ignore, strict=False)}
    return [(n, m) for n, m in named if n not in ignored], ignored, layer_experts(layer, adapter)


@torch.no_grad()
def quantized_forward(layer, index, groups, results, spec, hidden, kwargs, adapter=None, per_batch=None):
    """Decoder layer `index`'s output as the exported model computes it: the searched scales folded, every
    linear fake-quantized (inputs too for weight-activation runs) and, with the family's `adapter`, its fused
    expert weights per expert. As in export, the linears spec.ignore selects (and adapter.keep_fp) stay fp and
    a group whose linears are all ignored is not folded. Changes `layer`. per_batch: samples per micro-batch
    (None: all at once)."""
    with quantized_layer(layer, index, groups, results, spec, adapter):
        return forward_micro_batched(layer, hidden, kwargs, hidden.shape[0] if per_batch is None else per_batch)


def fold_searched(layer, index, groups, results, spec, adapter):
    """Fold the searched scales of `groups` (their `results`) into decoder layer `index` as export does: a group
    whose linears spec.ignore all selects is not folded. Returns quantized_parts of the layer."""
    parts = quantized_parts(layer, adapter, f"layers.{index}.", spec.ignore)
    folds = resolve_scales(layer, [(g.prev, g.consumers, r.scales) for g, r in zip(groups, results)], "search")
    fold(groups_to_fold(folds, parts[1])[0])
    return parts


@contextmanager
def quantized_layer(layer, index, groups, results, spec, adapter):
    """fold_searched, then every linear and fused expert export quantizes fake-quantized in place; while inside,
    their inputs are quantized too for weight-activation runs. Changes `layer` (weights_kept restores it)."""
    linears, _, experts = fold_searched(layer, index, groups, results, spec, adapter)
    quantize_linears(linears + experts, spec)
    with quantized_inputs([m for _, m in linears], spec.scheme, expert_modules(layer, adapter)):
        yield
