"""The bf16 GEMM throughput the search's MLP grid forwards can reach: a Qwen2-VL-7B layer's gate, up and down
projections at the 90 % loss-token share (73728 of 128 x 640 tokens), gate and up as two GEMMs and as one over
their stacked weights, and SiLU(g) * u for scale. Issue 16's floor: the search's 943 TFLOP at this throughput.

    python benchmarks/gemm_floor.py --out benchmarks/results/gemm_floor_7b_h200.json
"""
import argparse

import torch

from common import SHAPES, environment, write_json


def seconds(f, repeats=20):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        f()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1e3 / repeats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=73728)
    ap.add_argument("--search-tflop", type=float, default=943.0, help="the search's GEMM work per layer")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    n, c, i = args.tokens, SHAPES["7b"]["hidden_size"], SHAPES["7b"]["intermediate_size"]
    new = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    x, w_gate, w_up, w_down, h = new(n, c), new(i, c), new(i, c), new(c, i), new(n, i)
    w_gate_up = torch.cat([w_gate, w_up])
    flop = 2 * n * c * i
    separate = seconds(lambda: (x @ w_gate.T, x @ w_up.T))
    stacked = seconds(lambda: x @ w_gate_up.T)
    down = seconds(lambda: h @ w_down.T)
    silu_mul = seconds(lambda: torch.nn.functional.silu(h) * h)
    best = max(2 * flop / separate, 2 * flop / stacked, flop / down)
    write_json(args.out, {
        "settings": vars(args), "env": environment(),
        "gate_up_separate_s": separate, "gate_up_stacked_s": stacked, "down_s": down, "silu_mul_s": silu_mul,
        "tflops": {"gate_up_separate": 2 * flop / separate / 1e12, "gate_up_stacked": 2 * flop / stacked / 1e12,
                   "down": flop / down / 1e12},
        "search_gemm_floor_s": args.search_tflop * 1e12 / best,
    })


if __name__ == "__main__":
    main()
