"""Packed (compressed-tensors) vs bf16 checkpoint sizes per scheme: measured on the demo model, predicted
from shapes for Qwen2-VL-7B. Also the share of bf16 weights whose code would be one step off if codes were
computed from the unrounded fp32 scale (the trap quant.fake.round_scale_ avoids).

    python benchmarks/packed_sizes.py --out results/packed_sizes.json
"""
import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch

from vlmquant.models.tiny import make_demo_model
from vlmquant.export.packed import write_packed
from vlmquant.export.sizes import packed_size, packed_size_from_config, qwen2_vl_7b_config
from vlmquant.models import get_adapter
from vlmquant.quant.codes import Scheme, quantize_weight
from vlmquant.quant.model import decoder_linears

ADAPTER = get_adapter("qwen2_vl")
SCHEMES = [Scheme(4, 128), Scheme(4, 128, True), Scheme(4, -1, True), Scheme(8, 128), Scheme(8, -1, True),
           Scheme(3, 128), Scheme(8, -1, True, a_bit=8), Scheme(4, -1, True, a_bit=8),
           Scheme(8, -1, True, "float", 8, "float")]


def stored_bytes(folder):
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def off_by_one_share(linears, scheme):
    """Share of weights whose asymmetric code differs when computed from the fp32 (unrounded) group scale."""
    off = total = 0
    for lin in linears:
        w = lin.weight.detach()
        fp32 = quantize_weight(w.float(), scheme).codes  # scale kept in fp32
        off += (fp32 != quantize_weight(w, scheme).codes).sum().item()
        total += w.numel()
    return off / total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    model, _ = make_demo_model("qwen2_vl")
    model = model.to(torch.bfloat16)
    names = [n for n, _ in decoder_linears(model, ADAPTER)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "bf16")
        dense = stored_bytes(Path(tmp) / "bf16")
        for scheme in SCHEMES:
            folder = Path(tmp) / scheme.name
            write_packed(copy.deepcopy(model), ADAPTER, names, scheme, folder)
            big = packed_size_from_config(qwen2_vl_7b_config(), ADAPTER, scheme)
            rows.append({"scheme": scheme.name, "format": scheme.format, "demo_bf16_bytes": dense,
                         "demo_packed_bytes": stored_bytes(folder),
                         "demo_predicted_bytes": packed_size(model, ADAPTER, scheme)["packed"],
                         "demo_ratio": round(dense / stored_bytes(folder), 3),
                         "7b_bf16_bytes": big["dense"], "7b_packed_bytes": big["packed"], "7b_ratio": round(big["ratio"], 3),
                         "off_by_one_share_without_scale_rounding": (
                             round(off_by_one_share([l for _, l in decoder_linears(model, ADAPTER)], scheme), 4)
                             if scheme.w_type == "int" else None)})
    print("| scheme | format | demo bf16 MB | demo packed MB | ratio | 7B bf16 GB | 7B packed GB | ratio | codes off w/o rounding |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        off = r["off_by_one_share_without_scale_rounding"]
        print(f"| {r['scheme']} | {r['format']} | {r['demo_bf16_bytes'] / 1e6:.2f} | {r['demo_packed_bytes'] / 1e6:.2f} | "
              f"{r['demo_ratio']:.2f} | {r['7b_bf16_bytes'] / 1e9:.2f} | {r['7b_packed_bytes'] / 1e9:.2f} | "
              f"{r['7b_ratio']:.2f} | {'-' if off is None else f'{off:.1%}'} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
