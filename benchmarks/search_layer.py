"""Seconds per decoder layer of the MBQ scale search, against a straightforward per-group loop.

Random-init Qwen2-VL decoder layer of a real shape; random hidden states with outlier
channels. Writes a JSON with the timings, a breakdown and the achieved TFLOP/s.

    python benchmarks/search_layer.py --shape 7b --samples 128 --tokens 640 --out benchmarks/results/x.json
"""
import argparse
import copy

import torch

from common import environment, layer_inputs, random_layer, sync, text_config, timer, write_json
from vlmquant.models import get_adapter
from vlmquant.quant.fake import fake_quant_weight
from vlmquant.search import grid, layer as layer_mod
from vlmquant.search.grid import group_loss


def layer_flops(cfg, B, T):
    """Matmul FLOPs of one forward of each group's block (attention scores included)."""
    C, I, H, KV = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
    d = C // H
    n = B * T
    qkvo = 2 * n * C * (2 * C + 2 * KV * d)
    sdpa = 2 * 2 * B * H * T * T * d / 2  # QK^T and PV, causal half
    mlp = 2 * n * 3 * C * I
    return {"self_attn": qkvo + sdpa, "self_attn.o_proj": 2 * n * C * C, "mlp": mlp, "mlp.down_proj": 2 * n * C * I,
            "layer": qkvo + sdpa + mlp}


def straightforward(layer, groups, records, masks, run, ratios):
    """The reference loop: copy the layer's weights, scale, fake-quantize, forward, restore; per α."""
    out = []
    for gi, g in enumerate(groups):
        rec = records[gi]
        block = layer.get_submodule(g.block)
        linears = [layer.get_submodule(n) for n in g.linears]
        a = rec["x"].abs().reshape(-1, rec["x"].shape[-1]).float().mean(0)
        best = None
        for i in range(run["n_grid"]):
            state = copy.deepcopy(layer.state_dict())
            s = a.pow(i / run["n_grid"]).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin in linears:
                w = lin.weight.data.float() * s
                lin.weight.data = (fake_quant_weight(w, run["w_bit"], run["w_group"]) / s).to(lin.weight.dtype)
            o = block(*rec["args"], **rec["kwargs"])
            o = o[0] if isinstance(o, tuple) else o
            loss = group_loss(rec["out"].float(), o.float(), masks, run["loss"], ratios[g.ratio])
            if best is None or loss < best[0]:
                best = (loss, i)
            layer.load_state_dict(state)
        out.append(best)
    return out


def instrumented(layer, groups, hidden, kwargs, masks, run, ratios):
    """One search with synchronizing timers around each stage (slower; for the breakdown only)."""
    t = {}
    orig_q, orig_loss, orig_search, orig_record = grid.scaled_fake_quant, grid.group_loss, layer_mod.search_group, layer_mod.record_layer

    def q(*a, **k):
        with timer(t, "quantizer"):
            return orig_q(*a, **k)

    def loss(*a, **k):
        with timer(t, "loss"):
            return orig_loss(*a, **k)

    def search(x, linears, forward, *a, **k):
        def fwd():
            with timer(t, "grid_forwards"):
                return forward()
        with timer(t, "search_total"):
            return orig_search(x, linears, fwd, *a, **k)

    def record(*a, **k):
        with timer(t, "feature_capture"):
            return orig_record(*a, **k)

    grid.scaled_fake_quant, grid.group_loss, layer_mod.search_group, layer_mod.record_layer = q, loss, search, record
    try:
        layer_mod.search_layer(layer, groups, hidden, kwargs, masks, run, ratios)
    finally:
        grid.scaled_fake_quant, grid.group_loss, layer_mod.search_group, layer_mod.record_layer = orig_q, orig_loss, orig_search, orig_record
    t["other_in_search"] = t["search_total"] - t["grid_forwards"] - t["quantizer"] - t["loss"]
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=640)
    ap.add_argument("--w-bit", type=int, default=3)
    ap.add_argument("--w-group", type=int, default=128)
    ap.add_argument("--grid", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", action="store_true", help="also time the straightforward loop")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = text_config(args.shape)
    layer = random_layer(cfg, device, dtype)
    hidden, kwargs, masks = layer_inputs(cfg, args.samples, args.tokens, device, dtype)
    groups = get_adapter("qwen2_vl").resolve_groups(layer)
    run = {"method": "mbq", "w_bit": args.w_bit, "w_group": args.w_group, "n_grid": args.grid, "loss": "mae", "reweight": True}
    ratios = {"attn": 2.0, "mlp": 1.5}
    result = {"settings": vars(args), "env": environment(), "groups": [g.prev for g in groups]}

    layer_mod.search_layer(layer, groups, hidden, kwargs, masks, run, ratios)  # warm-up
    times = []
    for _ in range(args.repeats):
        t = {}
        with timer(t, "s"):
            results, _ = layer_mod.search_layer(layer, groups, hidden, kwargs, masks, run, ratios)
        times.append(t["s"])
    result["seconds_per_layer"] = min(times)
    result["seconds_per_layer_all"] = times
    result["alpha"] = [r.alpha for r in results]
    result["breakdown_seconds"] = instrumented(layer, groups, hidden, kwargs, masks, run, ratios)

    fl = layer_flops(cfg, args.samples, args.tokens)
    total = fl["layer"] + args.grid * sum(fl[g.block] for g in groups)
    result["tflop"] = total / 1e12
    result["achieved_tflops"] = total / 1e12 / result["seconds_per_layer"]
    result["floor_21_layer_forwards_tflop"] = 21 * fl["layer"] / 1e12
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        layer_mod.search_layer(layer, groups, hidden, kwargs, masks, run, ratios)
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30

    if args.baseline:
        _, records = layer_mod.record_layer(layer, groups, hidden, kwargs)
        t = {}
        with timer(t, "s"):
            base = straightforward(layer, groups, records, masks, run, ratios)
        result["baseline_seconds_per_layer"] = t["s"]
        result["baseline_alpha"] = [i / args.grid for _, i in base]
        result["speedup"] = t["s"] / result["seconds_per_layer"]
    sync()
    write_json(args.out, result)


if __name__ == "__main__":
    main()
