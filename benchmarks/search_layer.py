"""Seconds per decoder layer of the MBQ scale search, against a straightforward per-group loop.

Random-init Qwen2-VL decoder layer of a real shape; random hidden states with outlier
channels; per sample, --vision image tokens from position 16 and --caption answer tokens at the
end. Token-wise blocks (MLP, o_proj, down_proj) run on only the tokens the loss reads: with MBQ's
reweighting, the caption and vision ones. Writes a JSON with the timings, a breakdown and the
achieved TFLOP/s (FLOPs as performed; `tflop_all_tokens` if every token were run).

    python benchmarks/search_layer.py --shape 7b --samples 128 --tokens 640 --out benchmarks/results/x.json
"""
import argparse
import copy
import dataclasses
import time

import torch

from common import environment, layer_inputs, random_layer, sync, text_config, time_search, timer, write_json
from vlmquant.models import get_adapter
from vlmquant.spec import RunSpec
from vlmquant.quant.fake import fake_quant_weight
from vlmquant.search import grid, layer as layer_mod
from vlmquant.search.grid import group_loss, loss_tokens
from vlmquant.search.plan import plan_layer


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


@torch.no_grad()
def straightforward(layer, groups, records, masks, run, ratios):
    """The reference loop: copy the layer's weights, scale, fake-quantize, forward, restore; per α."""
    out = []
    for gi, g in enumerate(groups):
        rec = records[gi]
        part = rec["parts"][0]  # one part: every sample at once
        block = layer.get_submodule(g.block)
        linears = [layer.get_submodule(n) for n in g.linears]
        a = rec["x"].abs().reshape(-1, rec["x"].shape[-1]).float().mean(0)
        best = None
        for i in range(run.n_grid):
            state = copy.deepcopy(layer.state_dict())
            s = a.pow(i / run.n_grid).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin in linears:
                w = lin.weight.data.float() * s
                lin.weight.data = (fake_quant_weight(w, run.w_bit, run.w_group) / s).to(lin.weight.dtype)
            o = block(*part["args"], **part["kwargs"])
            o = o[0] if isinstance(o, tuple) else o
            loss = group_loss(part["out"].float(), o.float(), masks, run.loss, ratios[g.site])
            if best is None or loss < best[0]:
                best = (loss, i)
            layer.load_state_dict(state)
        out.append(best)
    return out


def instrumented(layer, plan, hidden, kwargs, masks, run, ratios):
    """One search with synchronizing timers around each stage (slower; for the breakdown only)."""
    t = {"quantizer": 0.0, "loss": 0.0, "grid_forwards": 0.0}
    orig_quantizer, orig_loss, orig_record = grid.quantizer, grid.loss_sums, layer_mod.record_layer

    def timed(key, fn):
        def f(*a, **k):
            with timer(t, key):
                return fn(*a, **k)
        return f

    def quantizer(scheme):  # the weight quantizer of each candidate; activation quantization counts as forward time
        q = orig_quantizer(scheme)
        return dataclasses.replace(q, scaled_weight=timed("quantizer", q.scaled_weight))

    def timed_search(search):
        def f(job, spec):
            job = dataclasses.replace(job, forwards=[timed("grid_forwards", fwd) for fwd in job.forwards])
            with timer(t, "search_total"):
                return search(job, spec)
        return f

    grid.quantizer, grid.loss_sums = quantizer, timed("loss", orig_loss)
    layer_mod.record_layer = timed("feature_capture", orig_record)
    try:
        timed_plan = dataclasses.replace(plan, searches=[timed_search(f) for f in plan.searches])
        layer_mod.search_layer(layer, timed_plan, hidden, kwargs, masks, run, ratios)
    finally:
        grid.quantizer, grid.loss_sums, layer_mod.record_layer = orig_quantizer, orig_loss, orig_record
    t["other_in_search"] = t["search_total"] - t["grid_forwards"] - t["quantizer"] - t["loss"]
    return t


KERNEL_KINDS = (("gemm", ("gemm", "cutlass", "sm90_", "xmma", "nvjet", "matmul")), ("attention", ("flash", "fmha", "attention")),
                ("reduce", ("reduce", "amin", "amax", "sum_", "norm")), ("copy/cast", ("copy", "cast", "convert")))


def kernel_profile(fn, top=15):
    """Device seconds of one call of fn by kernel kind (gemm, attention, reduce, copy/cast, other elementwise), the
    top kernels, and the wall time the profiler saw: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - t
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    kinds = {}
    for e in events:
        name = e.key.lower()
        kind = next((k for k, needles in KERNEL_KINDS if any(n in name for n in needles)), "elementwise/other")
        kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / 1e6
    events.sort(key=lambda e: -e.self_device_time_total)
    return {"wall_seconds": wall, "device_seconds": sum(kinds.values()), "by_kind_seconds": kinds,
            "top": [{"kernel": e.key[:120], "seconds": e.self_device_time_total / 1e6, "calls": e.count} for e in events[:top]]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=640)
    ap.add_argument("--vision", type=int, default=256, help="vision tokens per sample")
    ap.add_argument("--caption", type=int, default=64, help="caption tokens per sample")
    ap.add_argument("--w-bit", type=int, default=3)
    ap.add_argument("--w-group", type=int, default=128)
    ap.add_argument("--grid", type=int, default=20)
    ap.add_argument("--a-bit", type=int, help="weight-activation run (weights per output channel)")
    ap.add_argument("--w-type", default="int", choices=["int", "nvfp4", "mxfp4"],
                    help="weight format (nvfp4/mxfp4: FP4 E2M1 in the format's groups; --w-bit 4, --w-group ignored)")
    ap.add_argument("--method", default="mbq", choices=["mbq", "smoothquant"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", action="store_true", help="also time the straightforward loop")
    ap.add_argument("--profile", action="store_true", help="GPU kernel times of one search (torch.profiler), by kernel")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = text_config(args.shape)
    layer = random_layer(cfg, device, dtype)
    if 16 + args.vision + args.caption > args.tokens:
        raise SystemExit("16 + --vision + --caption must fit in --tokens")
    hidden, kwargs, masks = layer_inputs(cfg, args.samples, args.tokens, device, dtype, args.vision, args.caption)
    settings = {"method": args.method, "w_bit": args.w_bit, "loss": "mae", "w_type": args.w_type}
    if args.a_bit:
        settings["a_bit"] = args.a_bit
    elif args.w_type == "int":
        settings["w_group"] = args.w_group
    settings.update({"alpha": 0.5} if args.method == "smoothquant" else {"n_grid": args.grid})
    run = RunSpec.from_config(args.method, settings)
    plan = plan_layer(run, layer, 0, get_adapter("qwen2_vl"))
    groups = plan.groups
    ratios = {"attn": 2.0, "mlp": 1.5} if args.method == "mbq" else None
    if args.method == "smoothquant" and args.a_bit is None:
        raise SystemExit("smoothquant needs --a-bit")
    if args.baseline and (args.a_bit or args.method != "mbq" or args.w_type != "int"):
        raise SystemExit("the straightforward loop is weight-only integer mbq; drop --baseline")
    result = {"settings": vars(args), "env": environment(), "groups": [g.prev for g in groups]}

    results, times = time_search(layer_mod.search_layer, args.repeats, layer, plan, hidden, kwargs, masks, run, ratios)
    result["seconds_per_layer"] = min(times)
    result["seconds_per_layer_all"] = times
    result["alpha"] = [r.alpha for r in results]
    n_candidates = args.grid
    if args.method == "mbq":
        result["breakdown_seconds"] = instrumented(layer, plan, hidden, kwargs, masks, run, ratios)
    else:
        n_candidates = 2  # RTN and the smoothed scales

    fl = layer_flops(cfg, args.samples, args.tokens)
    share = float(loss_tokens(masks, ratios is not None).float().mean())
    total, all_tokens = (fl["layer"] + n_candidates * sum(fl[g.block] * (f if g.token_wise else 1) for g in groups)
                         for f in (share, 1))
    result["loss_token_share"] = share
    result["tflop"] = total / 1e12
    result["tflop_all_tokens"] = all_tokens / 1e12
    result["achieved_tflops"] = total / 1e12 / result["seconds_per_layer"]
    result["floor_21_layer_forwards_tflop"] = 21 * fl["layer"] / 1e12
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        layer_mod.search_layer(layer, plan, hidden, kwargs, masks, run, ratios)
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30

    if args.profile and device == "cuda":
        result["kernels"] = kernel_profile(lambda: layer_mod.search_layer(layer, plan, hidden, kwargs, masks, run, ratios))

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
