"""The per-expert scale groups of fused mixture-of-experts weights, searched for all experts at once.

transformers 5 holds a MoE block's experts as two 3-D parameters, gate_up_proj (E, 2I, H) (gate
rows [0, I), up rows [I, 2I)) and down_proj (E, H, I), and computes expert e on the tokens routed
to it as down_e(act(gate_e x) * up_e x). Expert e's group is up_e → down_e: its up rows are divided
by s_e (I,), the columns of down_e multiplied. Each expert is searched on the (token, expert) pairs
routed to it, as a loop over experts would do it, but every grid point quantizes all experts in one
op (the scheme's quant.quantizer scaled_weight on (E, H, I) with s (E, 1, I)) and runs them in one grouped matmul
over the pairs sorted by expert (torch's grouped_mm where it runs, else a loop over experts).
The loss of expert e is `grid.group_loss` over its pairs (its down_proj output, not weighted by the
routing weight, as a per-expert loop measures it); an expert no calibration token in the loss is
routed to keeps α = 0 (s = 1, RTN) and its token count 0 says so. A weight-activation scheme also
quantizes every pair's down_proj input per token as the scaled model sees it, Q_a(h/s_e)·s_e (the
scheme's quantizer act), as the dense search does on a group's input (grid.candidate_losses).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmquant.methods import awq, mbq
from vlmquant.methods.base import register_experts_search
from vlmquant.quant.quantizer import quantizer
from vlmquant.search.grid import grid_scales, loss_tokens, token_distance


def grouped_mm_runs(x: torch.Tensor) -> bool:
    """Whether torch's grouped matmul takes `x`: on CPU (torch >= 2.9, any float dtype), on CUDA in bf16 on
    SM >= 80 (its docstring); elsewhere expert_linear loops over experts."""
    if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    if x.device.type == "cpu":
        return True
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)


def expert_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x (S, in) sorted by expert times each expert's weight: (S, out), row r of expert e = w[e] @ x[r].

    w: (E, out, in); offs: (E,) int32 cumulative ends of each expert's rows (offs[-1] = S).
    """
    if grouped_mm_runs(x):
        mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
        return mm(x, w.transpose(-2, -1), offs=offs)
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = F.linear(x[start:end], w[e])
        start = end
    return out


def down_inputs(experts, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The input of down_proj, act(gate) * up (S, I), for rows of x (S, H) sorted by expert (offs as expert_linear)."""
    gate, up = expert_linear(x, experts.gate_up_proj, offs).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def sort_pairs(top_k_index: torch.Tensor, keep: torch.Tensor, n_experts: int):
    """The routed (token, expert) pairs of the tokens in `keep` (N,), sorted by expert (stable: token order
    within an expert): (token (S,), expert (S,), counts (E,), offs (E,) int32)."""
    n, k = top_k_index.shape
    token = torch.arange(n, device=top_k_index.device).repeat_interleave(k)
    expert = top_k_index.reshape(-1)
    pick = keep.to(token.device)[token]
    token, expert = token[pick], expert[pick]
    order = torch.argsort(expert, stable=True)
    token, expert = token[order], expert[order]
    counts = torch.bincount(expert, minlength=n_experts)
    return token, expert, counts, counts.cumsum(0).to(torch.int32)


@dataclass
class ExpertsSearch:
    """The per-expert group of one MoE block, as a method sees it (methods.base.register_experts_search).

    down: the experts' down_proj (E, H, I), changed and restored by the search. a: (E, I) fp32 mean |input of
    down_e| over the valid tokens routed to e (the channel statistics). h: (S, I) inputs of the routed pairs
    whose token is in the loss, sorted by expert; offs (E,) int32 their ends; expert (S,) their experts;
    masks: {"valid", "cap", "vis"} (S,) of their tokens; fp_out (S, H) = down_e(h); tokens (E,) pairs per expert;
    ratio: the reweight ratio ρ of the group, None: no reweighting.
    """
    down: torch.Tensor
    a: torch.Tensor
    h: torch.Tensor
    offs: torch.Tensor
    expert: torch.Tensor
    masks: dict
    fp_out: torch.Tensor
    tokens: torch.Tensor
    ratio: float | None = None


@dataclass
class ExpertsResult:
    """Per expert: scales (E, I) fp32, alpha (E,), losses (E, n_candidates) (column 0: α = 0, RTN), best (E,),
    tokens (E,) routed calibration tokens in the loss (0: α stays 0)."""
    scales: torch.Tensor
    alpha: torch.Tensor
    losses: torch.Tensor
    best: torch.Tensor
    tokens: torch.Tensor
    ratio: float | None = None


@torch.no_grad()
def experts_job(experts, hidden, top_k_index, masks, ratio=None) -> ExpertsSearch:
    """The ExpertsSearch of a MoE block from what its experts module (checked by quant.model.check_gated_experts) was
    called with in the fp forward.

    hidden: (N, H) the block's (flattened) input; top_k_index (N, k) the routed experts; masks: per-token
    {"valid", "cap", "vis"} (N,) or (B, T); ratio: ρ, the loss then reads only caption and vision tokens.
    """
    down = experts.down_proj
    n_experts = down.shape[0]
    masks = {k: v.reshape(-1).to(hidden.device) for k, v in masks.items()}
    token, expert, counts, offs = sort_pairs(top_k_index, masks["valid"], n_experts)
    h = down_inputs(experts, hidden[token], offs)  # (S_valid, I)
    a = torch.zeros(n_experts, h.shape[1], dtype=torch.float32, device=h.device)
    a.index_add_(0, expert, h.abs().float()).div_(counts.clamp(min=1)[:, None])
    in_loss = loss_tokens(masks, ratio is not None)[token]
    token, expert, h = token[in_loss], expert[in_loss], h[in_loss]
    tokens = torch.bincount(expert, minlength=n_experts)
    offs = tokens.cumsum(0).to(torch.int32)
    return ExpertsSearch(down, a, h, offs, expert, {k: v[token] for k, v in masks.items()},
                         expert_linear(h, down, offs), tokens, ratio)


def expert_losses(d, expert, masks, n_experts, n_ch, loss="mae", ratio=None) -> torch.Tensor:
    """grid.group_loss of every expert over its pairs, from per-pair distances d (S,) fp32: (E,) fp32.

    An expert without pairs in a term adds 0 (it has no loss to search on and keeps α = 0).
    """
    def total(m):
        return torch.zeros(n_experts, dtype=torch.float32, device=d.device).index_add_(0, expert[m], d[m])

    def count(m):
        return torch.bincount(expert[m], minlength=n_experts).to(torch.float32) * n_ch

    valid = masks["valid"]
    if ratio is None:
        return total(valid) / count(valid).clamp(min=1)
    cap, vis = masks["cap"] & valid, masks["vis"] & valid
    if loss == "mae":
        return (total(cap) + ratio * total(vis)) / (count(cap) + count(vis)).clamp(min=1)
    return total(cap) / count(cap).clamp(min=1) + ratio * total(vis) / count(vis).clamp(min=1)


@register_experts_search(mbq.METHOD, awq.METHOD)
@torch.no_grad()
def search_experts(job: ExpertsSearch, spec) -> ExpertsResult:
    """Grid-search every expert's up → down scales at once (see the module doc; the run's spec: scheme, n_grid,
    loss).

    Candidates per expert: s_e = a_e^α normalized (grid.grid_scales), α = 0, 1/n_grid, …; each expert keeps
    the α with its strictly smallest loss (the first of equal minima: α = 0 where it has no token). A
    weight-activation scheme quantizes each pair's input h as Q_a(h/s_e)·s_e (the module doc). The layer's
    plan (search.plan) has checked the experts module and the scheme.
    """
    q, n_grid = quantizer(spec.scheme), spec.n_grid
    down = job.down
    original = down.detach().clone()
    n_experts, n_ch = down.shape[0], down.shape[1]
    grid = grid_scales(job.a, n_grid)  # n_grid × (E, I)
    losses = []
    try:
        for s in grid:
            down.copy_(q.scaled_weight(original, s[:, None, :]))  # Q(W_e·s_e)/s_e of every expert, (E, H, I)
            h = job.h if q.act is None else q.act(job.h, s[job.expert])  # Q_a(h/s_e)·s_e per pair, (S, I)
            d = token_distance(job.fp_out, expert_linear(h, down, job.offs), spec.loss == "mse")  # (S,)
            del h
            losses.append(expert_losses(d, job.expert, job.masks, n_experts, n_ch, spec.loss, job.ratio))
    finally:
        down.copy_(original)
    table = torch.stack(losses, 1).cpu()  # (E, n_grid)
    best = torch.tensor([min(range(n_grid), key=row.__getitem__) for row in table.tolist()])
    scales = torch.stack([grid[int(b)][e] for e, b in enumerate(best)])
    return ExpertsResult(scales=scales, alpha=best.float() / n_grid, losses=table, best=best, tokens=job.tokens.cpu())
