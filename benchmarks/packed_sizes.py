"""Packed (compressed-tensors) vs bf16 checkpoint sizes per scheme: measured on the demo model and on the
Qwen3-VL-MoE demo (experts packed per expert), predicted from shapes for Qwen2-VL-7B and Qwen3-VL-30B-A3B. Also
the share of bf16 weights whose code would be one step off if codes were computed from the unrounded fp32 scale
(the trap quant.fake.round_scale_ avoids).

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
from vlmquant.export.sizes import packed_size, packed_size_from_config, qwen2_vl_7b_config, qwen3_vl_30b_a3b_config
from vlmquant.models import get_adapter
from vlmquant.quant.codes import quantize_weight
from vlmquant.quant.scheme import Scheme
from vlmquant.quant.model import decoder_linears

ADAPTER = get_adapter("qwen2_vl")
MOE_ADAPTER = get_adapter("qwen3_vl_moe")
SCHEMES = [Scheme(4, 128), Scheme(4, 128, True), Scheme(4, -1, True), Scheme(8, 128), Scheme(8, -1, True),
           Scheme(3, 128), Scheme(8, -1, True, a_bit=8), Scheme(4, -1, True, a_bit=8),
           Scheme(8, -1, True, "float", 8, "float"), Scheme(4, 16, True, "nvfp4"), Scheme(4, 32, True, "mxfp4")]


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


def measured(family, adapter, scheme, tmp):
    """{"bf16", "packed", "predicted"} bytes of the family's bf16 demo model, packed under `scheme` in folder `tmp`."""
    model = make_demo_model(family)[0].to(torch.bfloat16)
    dense = Path(tmp) / f"{family}-bf16"
    if not dense.exists():
        model.save_pretrained(dense)
    folder = Path(tmp) / f"{family}-{scheme.name}"
    names = [n for n, _ in decoder_linears(model, adapter)]
    predicted = packed_size(model, adapter, scheme)["packed"]
    write_packed(copy.deepcopy(model), adapter, names, scheme, folder)
    return {"bf16": stored_bytes(dense), "packed": stored_bytes(folder), "predicted": predicted}, model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in SCHEMES:
            demo, model = measured("qwen2_vl", ADAPTER, scheme, tmp)
            moe, _ = measured("qwen3_vl_moe", MOE_ADAPTER, scheme, tmp)
            big = packed_size_from_config(qwen2_vl_7b_config(), ADAPTER, scheme)
            moe_big = packed_size_from_config(qwen3_vl_30b_a3b_config(), MOE_ADAPTER, scheme)
            rows.append({"scheme": scheme.name, "format": scheme.format, "demo_bf16_bytes": demo["bf16"],
                         "demo_packed_bytes": demo["packed"], "demo_predicted_bytes": demo["predicted"],
                         "demo_ratio": round(demo["bf16"] / demo["packed"], 3),
                         "7b_bf16_bytes": big["dense"], "7b_packed_bytes": big["packed"], "7b_ratio": round(big["ratio"], 3),
                         "moe_demo_bf16_bytes": moe["bf16"], "moe_demo_packed_bytes": moe["packed"],
                         "moe_demo_predicted_bytes": moe["predicted"],
                         "moe_demo_ratio": round(moe["bf16"] / moe["packed"], 3),
                         "30b_a3b_bf16_bytes": moe_big["dense"], "30b_a3b_packed_bytes": moe_big["packed"],
                         "30b_a3b_ratio": round(moe_big["ratio"], 3),
                         "off_by_one_share_without_scale_rounding": (
                             round(off_by_one_share([l for _, l in decoder_linears(model, ADAPTER)], scheme), 4)
                             if scheme.w_type == "int" else None)})
    print("| scheme | format | demo ratio | 7B bf16 GB | 7B packed GB | ratio | MoE demo ratio | 30B-A3B bf16 GB | "
          "30B-A3B packed GB | ratio | codes off w/o rounding |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        off = r["off_by_one_share_without_scale_rounding"]
        print(f"| {r['scheme']} | {r['format']} | {r['demo_ratio']:.2f} | {r['7b_bf16_bytes'] / 1e9:.2f} | "
              f"{r['7b_packed_bytes'] / 1e9:.2f} | {r['7b_ratio']:.2f} | {r['moe_demo_ratio']:.2f} | "
              f"{r['30b_a3b_bf16_bytes'] / 1e9:.2f} | {r['30b_a3b_packed_bytes'] / 1e9:.2f} | "
              f"{r['30b_a3b_ratio']:.2f} | "
              f"{'-' if off is None else f'{off:.1%}'} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
