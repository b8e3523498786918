"""A search job's plan of each decoder layer, made once before any search work (search.pipeline.run_search).

The plan resolves the layer's scale groups (Adapter.layer_groups), picks each group's search function from the
method registry (methods.base: the modules imported here register them), and checks everything the searches
would otherwise check group by group: the scheme's bit widths, that every quantized consumer of a group takes
the same input width and can be split into w_group groups, that fused experts are of a kind the experts search
runs. A bad setting is then one error naming the layer and module, before the first forward. It works on a layer
on the meta device (shapes only).
"""
from dataclasses import dataclass
from typing import Callable

import torch

from vlmquant.errors import VlmquantError
from vlmquant.methods.base import experts_search_of, group_search_of
from vlmquant.models.base import layer_part
from vlmquant.quant.fake import check_weight_groups
from vlmquant.quant.fold import consumer_weight
from vlmquant.quant.model import check_gated_experts
from vlmquant.quant.quantizer import quantizer
from vlmquant.search import experts, grid, smooth  # noqa: F401  (their decorators register the methods' searches)

@dataclass
class LayerPlan:
    """What a search job does with decoder layer `index`.

    groups: its scale groups (models.base.ScaleGroup) in search order; skipped: [(group, reason)] of those that do
    not apply. Per group: searches, the method's function of its job ((GroupSearch or ExpertsSearch, RunSpec) →
    result; None for a method without scales, whose GPTQ uses the groups' sites and shapes only); periods, the period of its scales (group_period) or None.
    """
    index: int
    groups: list
    skipped: list
    searches: list[Callable]
    periods: list


SMOOTH_NORMS = "smooth: norms smooths only the groups a norm feeds"


def norm_fed(layer, g):
    """Is group `g`'s prev op a norm (not a linear or a fused expert weight)?"""
    return not isinstance(layer_part(layer, g.prev), (torch.Tensor, torch.nn.Linear))


def group_period(layer, g, n_in):
    """The period of the group's scales: a norm's width where its weight is shared by every head of a wider
    input (Qwen3.5's gated norm in linear attention), else None."""
    if not norm_fed(layer, g):
        return None
    d = layer_part(layer, g.prev).weight.numel()
    return d if d < n_in else None


def group_width(layer, index, g, scheme):
    """The input width every quantized consumer of group `g` takes, each checked against the scheme."""
    n_in = None
    for name in g.linears:
        w = consumer_weight(layer_part(layer, name))
        where = f"decoder layer {index} {name}"
        if w.dim() not in (2, 3) or w.shape[-1] != (n_in or w.shape[-1]):
            raise VlmquantError(f"{where}: weight of shape {tuple(w.shape)} does not take the group input's {n_in} "
                                "channels")
        try:
            check_weight_groups(tuple(w.shape), scheme.w_group)
        except VlmquantError as e:
            raise VlmquantError(f"{where}: {e}") from None
        n_in = w.shape[-1]
    return n_in


def plan_layer(spec, layer, index, adapter) -> LayerPlan:
    """The LayerPlan of decoder layer `index` (`layer`, any device, meta included) for the run `spec` (RunSpec).
    Raises VlmquantError naming the layer and module for anything the search could not do."""
    if "n_grid" in spec.method_def.settings and spec.n_grid < 1:
        raise VlmquantError(f"n_grid={spec.n_grid} must be at least 1")
    quantizer(spec.scheme)  # its bit widths
    groups, skipped = adapter.layer_groups(layer, index)
    if spec.smooth == "norms":  # smoothquant: only the groups a norm feeds (search.smooth)
        skipped = skipped + [(g, SMOOTH_NORMS) for g in groups if not norm_fed(layer, g)]
        groups = [g for g in groups if norm_fed(layer, g)]
    searches, periods = [], []
    for g in groups:
        n_in = group_width(layer, index, g, spec.scheme)
        if g.experts:
            check_gated_experts(layer.get_submodule(g.block))  # GPTQ reads gate_up_proj, down_proj too
            if spec.scheme.w_type == "nvfp4" and spec.a_bit is not None:
                raise VlmquantError(f"decoder layer {index} {g.block}: NVFP4 W4A4 has no static input scales for "
                                    "fused experts yet; use NVFP4A16 (no a_bit) on mixture-of-experts models")
            searches.append(experts_search_of(spec.method_def) if spec.has_scales else None)
            periods.append(None)
        else:
            searches.append(group_search_of(spec.method_def) if spec.has_scales else None)
            periods.append(group_period(layer, g, n_in))
    return LayerPlan(index, groups, skipped, searches, periods)
