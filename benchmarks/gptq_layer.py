"""Seconds per decoder layer of GPTQ (vlmquant.search.gptq), next to the straightforward column loop.

Random-init Qwen2-VL decoder layer of a real shape, random hidden states with outlier channels (common.py);
per sample, --vision image tokens from position 16 and --caption answer tokens at the end: the loss tokens,
whose inputs enter the Hessians (modality-weighted: ρ = 2.0 for attention linears, 1.5 for MLP ones, as
search_layer.py). Timed, after one warm-up:
  forward   one forward of the layer over the samples in micro-batches of --batch (the capture GPTQ needs anyway);
  hessians  the same forward with hooks adding every linear input to the four Hessians (q/k/v share one,
            gate/up one, o_proj, down_proj): hessians - forward is the accumulation's own cost;
  gptq      the 7 linears' GPTQ (act-order off unless --act-order);
  gptq_fused the same with the linears that share a Hessian concatenated along rows (q|k|v, gate|up: rows
            are independent, so the codes are the same up to floating-point order).
The straightforward loop (--baseline) quantizes each linear one column at a time, updating every remaining
column right away (no lazy blocks), with the same column quantizer; `codes_equal_fraction` compares its
codes with GPTQ's (fp32: a few rounding ties may differ, and what GPTQ carries on from them along the row;
`codes_max_difference` in quantization steps).

    python benchmarks/gptq_layer.py --shape 7b --samples 128 --tokens 640 --vision 512 --caption 64 --baseline \
        --out benchmarks/results/gptq_layer_7b_h100.json
"""
import argparse

import torch

from common import environment, layer_inputs, random_layer, sync, text_config, time_search, timer, write_json
from vlmquant.quant.scheme import Scheme
from vlmquant.search.gptq import Quantizer, check_inputs, gptq, inverse_cholesky
from vlmquant.search.hessian import Hessian

SITES = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv", "self_attn.o_proj": "o",
         "mlp.gate_proj": "gate_up", "mlp.up_proj": "gate_up", "mlp.down_proj": "down"}
RATIOS = {"qkv": 2.0, "o": 2.0, "gate_up": 1.5, "down": 1.5}


@torch.no_grad()
def forward(layer, hidden, kwargs, batch, before=None):
    """The layer over the samples in micro-batches of `batch`, calling before(sample slice) ahead of each."""
    for s in range(0, hidden.shape[0], batch):
        if before is not None:
            before(slice(s, s + batch))
        kw = {"position_embeddings": tuple(t[s:s + batch] for t in kwargs["position_embeddings"]),
              "position_ids": kwargs["position_ids"][:, s:s + batch]}
        layer(hidden[s:s + batch], **kw)


def layer_hessians(layer, hidden, kwargs, masks, batch):
    """The four Hessians of the layer's linear inputs, from one forward in micro-batches of `batch` samples."""
    hessians, handles, current = {}, [], {}
    loss = masks["valid"] & (masks["vis"] | masks["cap"])
    for name, site in SITES.items():
        lin = layer.get_submodule(name)
        if site not in hessians:
            hessians[site] = Hessian(lin.in_features, "modality", RATIOS[site], device=hidden.device)

            def hook(module, args, site=site):
                hessians[site].add(args[0], loss[current["rows"]], masks["vis"][current["rows"]])
            handles.append(lin.register_forward_pre_hook(hook))
    try:
        forward(layer, hidden, kwargs, batch, lambda rows: current.update(rows=rows))
    finally:
        for h in handles:
            h.remove()
    return {site: h.value() for site, h in hessians.items()}


def gptq_layer(layer, hessians, scheme, act_order, fused):
    """{linear name: GPTQResult} (fused: one GPTQ per Hessian, the linears' rows concatenated, results unsplit)."""
    if not fused:
        return {name: gptq(layer.get_submodule(name).weight, hessians[site], scheme, act_order=act_order)
                for name, site in SITES.items()}
    out = {}
    for site in hessians:
        names = [n for n, s in SITES.items() if s == site]
        w = torch.cat([layer.get_submodule(n).weight for n in names])
        out["|".join(names)] = gptq(w, hessians[site], scheme, act_order=act_order)
    return out


@torch.no_grad()
def straightforward(w, h, scheme, dampening=0.01):
    """Textbook GPTQ of one linear (no act-order): quantize column j, subtract its error times row j of U from
    every later column at once. Returns the codes (out, C_in) int8."""
    group = check_inputs(w, h, scheme, dampening)
    W, H = w.float().clone(), h.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    U = inverse_cholesky(H, dampening)
    quant = Quantizer(*W.shape, scheme, group, w.dtype, W)
    levels = torch.empty_like(W)
    for j in range(W.shape[1]):
        g = j // group
        if j % group == 0:
            quant.set_group(g, W[:, j:j + group])
        quant.level_(levels[:, j], W[:, j], g)
        err = (W[:, j] - levels[:, j] * quant.scale[g]) / U[j, j]
        W[:, j + 1:].addr_(err, U[j, j + 1:], alpha=-1)
    return quant.codes(levels, w.dtype).codes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b", help="7b, 72b or demo (the tiny CPU shape)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=640)
    ap.add_argument("--vision", type=int, default=512, help="vision tokens per sample (512 + 64 of 640: 90 %% in the loss)")
    ap.add_argument("--caption", type=int, default=64, help="caption tokens per sample")
    ap.add_argument("--batch", type=int, default=16, help="samples per forward while accumulating the Hessians")
    ap.add_argument("--w-bit", type=int, default=4)
    ap.add_argument("--w-group", type=int, default=128)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline", action="store_true", help="also time the straightforward column loop")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if 16 + args.vision + args.caption > args.tokens:
        raise SystemExit("16 + --vision + --caption must fit in --tokens")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = text_config(args.shape)
    layer = random_layer(cfg, device, dtype)
    hidden, kwargs, masks = layer_inputs(cfg, args.samples, args.tokens, device, dtype, args.vision, args.caption)
    scheme = Scheme(args.w_bit, args.w_group, args.symmetric)
    result = {"settings": vars(args), "env": environment(), "dtype": str(dtype), "scheme": scheme.name,
              "hessian": "modality", "ratios": RATIOS}
    loss = masks["valid"] & (masks["vis"] | masks["cap"])
    result["loss_token_share"] = float(loss.float().mean())

    def call(fn, *a):  # time_search takes a function returning (results, anything)
        return time_search(lambda: (fn(*a), None), args.repeats)

    _, t_fwd = call(forward, layer, hidden, kwargs, args.batch)
    hessians, t_h = call(layer_hessians, layer, hidden, kwargs, masks, args.batch)
    results, t_g = call(gptq_layer, layer, hessians, scheme, args.act_order, False)
    fused, t_f = call(gptq_layer, layer, hessians, scheme, args.act_order, True)
    result["forward_seconds"] = min(t_fwd)
    result["hessian_seconds"] = min(t_h)
    result["gptq_seconds"] = min(t_g)
    result["gptq_fused_seconds"] = min(t_f)
    result["seconds_per_layer"] = result["hessian_seconds"] + result["gptq_seconds"]  # forward included
    result["seconds_all"] = {"forward": t_fwd, "hessians": t_h, "gptq": t_g, "gptq_fused": t_f}
    same = [(r.quantized.codes == torch.cat([results[n].quantized.codes for n in key.split("|")])).float()
            for key, r in fused.items()]
    result["fused_codes_equal_fraction"] = float(sum(t.sum() for t in same) / sum(t.numel() for t in same))
    result["columns_per_layer"] = sum(layer.get_submodule(n).in_features for n in SITES)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        gptq_layer(layer, hessians, scheme, args.act_order, False)
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30

    if args.baseline:
        if args.act_order:
            raise SystemExit("the straightforward loop is in column order; drop --act-order with --baseline")
        t, same, total, apart = {}, 0, 0, 0
        for name, site in SITES.items():
            with timer(t, "s"):
                codes = straightforward(layer.get_submodule(name).weight, hessians[site], scheme)
            same += int((codes == results[name].quantized.codes).sum())
            total += codes.numel()
            apart = max(apart, int((codes.int() - results[name].quantized.codes.int()).abs().max()))
        result["baseline_seconds"] = t["s"]
        result["codes_equal_fraction"] = same / total
        result["codes_max_difference"] = apart  # in quantization steps
        result["speedup"] = t["s"] / result["gptq_seconds"]
    sync()
    write_json(args.out, result)


if __name__ == "__main__":
    main()
