"""Seconds per decoder layer of the MBQ scale search on Qwen3-VL layers, dense and mixture-of-experts, against the
straightforward loop in the same process.

Random-init Qwen3-VL text decoder layer of a real shape (8b: Qwen3-VL-8B; 30b-a3b: Qwen3-VL-30B-A3B, hidden 2048,
128 experts, top-8, expert width 768), random hidden states with outlier channels; per sample, --vision image
tokens from position 16 and --caption answer tokens at the end. The search is vlmquant's (search_layer: token-wise
blocks on the loss tokens only; the MoE block through transformers' experts forward; every expert's up → down
searched at once, one grouped matmul per grid point). The straightforward loop copies the layer's weights, scales,
fake-quantizes, runs every token and restores, per grid point: the MoE block through transformers' eager loop over
experts with each expert's weight quantized in its own call, and each expert's up → down searched on its own
tokens, one expert after the other. Both pick α per group (and per expert); the JSON records whether they agree,
the seconds per layer and per group, and the peak GPU memory.

    python benchmarks/search_moe.py --shape 30b-a3b --samples 128 --tokens 640 --w-bit 3 --baseline \
        --out benchmarks/results/search_moe_30b_a3b_w3_h200.json
"""
import argparse
import copy
import dataclasses

import torch
import torch.nn.functional as F

from common import QWEN3_SHAPES, environment, qwen3_layer, sync, time_search, timer, write_json
from vlmquant.models import get_adapter
from vlmquant.models.base import layer_part
from vlmquant.quant.fake import fake_quant_weight
from vlmquant.search import layer as layer_mod
from vlmquant.search.grid import grid_scales, group_loss, loss_tokens
from vlmquant.search.plan import plan_layer
from vlmquant.spec import RunSpec

def layer_inputs(cfg, samples, tokens, device, dtype, vision, caption, seed=1):
    """Hidden states with outlier channels, the layer's kwargs (RoPE of text positions: the three M-RoPE rows
    are equal there, so cos/sin are plain RoPE's) and the vision/caption masks."""
    g = torch.Generator(device=device).manual_seed(seed)
    C = cfg.hidden_size
    hidden = torch.randn(samples, tokens, C, device=device, dtype=dtype, generator=g)
    outliers = torch.randperm(C, generator=torch.Generator().manual_seed(seed))[: max(C // 100, 1)].to(device)
    hidden[..., outliers] *= 20
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2, device=device).float() / d))
    freqs = torch.arange(tokens, device=device).float()[:, None] * inv_freq  # (T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1).expand(samples, tokens, d)
    kwargs = {"position_embeddings": (emb.cos().to(dtype), emb.sin().to(dtype))}
    idx = torch.arange(tokens, device=device)
    vis = ((idx >= 16) & (idx < 16 + vision)).expand(samples, tokens)
    cap = (idx >= tokens - caption).expand(samples, tokens)
    masks = {"valid": torch.ones(samples, tokens, dtype=torch.bool, device=device), "vis": vis, "cap": cap}
    return hidden, kwargs, masks


def eager_experts(layer):
    """transformers' own loop over the hit experts, where the version has a switch."""
    experts = getattr(layer.mlp, "experts", None)
    if experts is not None and hasattr(getattr(experts, "config", None), "_experts_implementation"):
        experts.config._experts_implementation = "eager"


def quantized(w, s, bits, group):
    """Q(W·s)/s, a (E, out, in) stack one expert per call (the straightforward per-expert loop)."""
    if w.dim() == 2:
        return (fake_quant_weight(w.float() * s, bits, group) / s).to(w.dtype)
    return torch.stack([quantized(w[e], s, bits, group) for e in range(w.shape[0])])


@torch.no_grad()
def straightforward(layer, groups, records, masks, run, ratios):
    """The reference loop, every token, per grid point: copy the layer's weights, scale, quantize, forward, restore;
    a per-expert group expert by expert. Returns the kept grid index per group (a list per expert group)."""
    out = []
    for gi, g in enumerate(groups):
        rec, ratio = records[gi], ratios[g.site]
        if g.experts:
            args = layer_mod.expert_args(rec)
            out.append(expert_loop(layer.get_submodule(g.block), args[0], args[1], masks, run, ratio))
            continue
        part = rec["parts"][0]  # one part: every sample at once
        block = layer.get_submodule(g.block)
        weights = [getattr(p, "weight", p) for p in (layer_part(layer, n) for n in g.linears)]
        a = rec["x"].abs().reshape(-1, rec["x"].shape[-1]).float().mean(0)
        best = None
        for i, s in enumerate(grid_scales(a, run.n_grid)):
            state = copy.deepcopy(layer.state_dict())
            for w in weights:
                w.data = quantized(w.data, s, run.w_bit, run.w_group)
            o = block(*part["args"], **part["kwargs"])
            loss = group_loss(part["out"].float(), (o[0] if isinstance(o, tuple) else o).float(), masks, run.loss, ratio)
            if best is None or loss < best[0]:
                best = (loss, i)
            layer.load_state_dict(state)
        out.append(best[1])
    return out


def expert_loop(experts, hidden, top_k_index, masks, run, ratio):
    """Each expert's up → down on the valid tokens routed to it (loss on those in the loss), one α at a time."""
    masks = {k: v.reshape(-1) for k, v in masks.items()}
    keep = loss_tokens(masks, ratio is not None)
    best = []
    for e in range(experts.down_proj.shape[0]):
        tok = (top_k_index == e).any(-1) & masks["valid"]
        if not (tok & keep).any():
            best.append(0)
            continue
        gate, up = F.linear(hidden[tok], experts.gate_up_proj[e]).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        k = keep[tok]
        fp = F.linear(h[k], experts.down_proj[e])
        sub = {m: v[tok][k] for m, v in masks.items()}
        losses = [group_loss(fp, F.linear(h[k], quantized(experts.down_proj[e], s, run.w_bit, run.w_group)), sub,
                             run.loss, ratio)
                  for s in grid_scales(h.abs().float().mean(0), run.n_grid)]
        best.append(min(range(run.n_grid), key=losses.__getitem__))
    return best


def timed_plan(plan, seconds):
    """The layer's plan with every group's search timed (seconds: appended to, one per group)."""
    def wrap(fn):
        def f(job, spec):
            t = {}
            with timer(t, "s"):
                r = fn(job, spec)
            seconds.append(t["s"])
            return r
        return f
    return dataclasses.replace(plan, searches=[wrap(fn) for fn in plan.searches])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="30b-a3b", choices=list(QWEN3_SHAPES))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=640)
    ap.add_argument("--vision", type=int, default=256, help="vision tokens per sample")
    ap.add_argument("--caption", type=int, default=64, help="caption tokens per sample")
    ap.add_argument("--w-bit", type=int, default=3)
    ap.add_argument("--w-group", type=int, default=128)
    ap.add_argument("--grid", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline", action="store_true", help="also time the straightforward loop")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if 16 + args.vision + args.caption > args.tokens:
        raise SystemExit("16 + --vision + --caption must fit in --tokens")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer, cfg = qwen3_layer(args.shape, device, dtype)
    hidden, kwargs, masks = layer_inputs(cfg, args.samples, args.tokens, device, dtype, args.vision, args.caption)
    run = RunSpec.from_config("mbq", {"method": "mbq", "w_bit": args.w_bit, "w_group": args.w_group, "loss": "mae",
                                      "n_grid": args.grid})
    plan = plan_layer(run, layer, 0, get_adapter("qwen3_vl_moe"))
    groups = plan.groups
    ratios = {"attn": 2.0, "mlp": 1.5}
    result = {"settings": vars(args), "env": environment(), "groups": [g.prev for g in groups],
              "shape": QWEN3_SHAPES[args.shape]}

    results, times = time_search(layer_mod.search_layer, args.repeats, layer, plan, hidden, kwargs, masks, run, ratios)
    result["seconds_per_layer"] = min(times)
    result["seconds_per_layer_all"] = times
    best = [r.best.tolist() if g.experts else r.best_index for g, r in zip(groups, results)]
    result["alpha"] = [r.alpha.tolist() if g.experts else r.alpha for g, r in zip(groups, results)]
    experts = [r for g, r in zip(groups, results) if g.experts]
    if experts:
        result["experts_without_tokens"] = int((experts[0].tokens == 0).sum())
        result["tokens_per_expert_min_max"] = [int(experts[0].tokens.min()), int(experts[0].tokens.max())]
    seconds = []
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    layer_mod.search_layer(layer, timed_plan(plan, seconds), hidden, kwargs, masks, run, ratios)
    if device == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["seconds_by_group"] = dict(zip([g.prev + (" (per expert)" if g.experts else "") for g in groups], seconds))
    result["seconds_record_and_overhead"] = result["seconds_per_layer"] - sum(seconds)

    if args.baseline:
        _, records = layer_mod.record_layer(layer, groups, hidden, kwargs)
        eager_experts(layer)
        t = {}
        with timer(t, "s"):
            base = straightforward(layer, groups, records, masks, run, ratios)
        result["baseline_seconds_per_layer"] = t["s"]
        result["baseline_best"] = base
        result["same_alpha"] = base == best
        result["differing"] = [g.prev for g, a, b in zip(groups, best, base) if a != b]
        result["differing_experts"] = sum(x != y for g, a, b in zip(groups, best, base) if g.experts
                                          for x, y in zip(a, b))
        result["speedup"] = t["s"] / result["seconds_per_layer"]
    sync()
    write_json(args.out, result)


if __name__ == "__main__":
    main()
