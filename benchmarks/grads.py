"""Gradient stage on a random-init full Qwen2-VL text stack of a real shape, vs a per-sample loop.

Ours: frozen weights (activation gradients only), `batch_size` samples per forward/backward,
logits only at caption positions. Baseline: one sample at a time, weight gradients on, the
model's own loss. Reports seconds and peak GPU memory of each.

    python benchmarks/grads.py --shape 7b --layers 28 --samples 128 --tokens 640 --out x.json
"""
import argparse

import torch
import transformers

from common import SHAPES, environment, sync, timer, write_json
from vlmquant.models import get_adapter
from vlmquant.search.grads import gradient_stats


def build_model(shape, n_layers, device):
    s = dict(SHAPES[shape])
    section = s.pop("mrope_section")
    text = dict(**s, num_hidden_layers=n_layers, vocab_size=152064, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e6},
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
    vision = dict(depth=1, embed_dim=64, hidden_size=s["hidden_size"], num_heads=2, mlp_ratio=2)
    cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=151655,
                                     video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen2VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def samples_for(n, tokens, vocab, vision=256, caption=64):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 150000, (1, tokens), generator=g)
        idx = torch.arange(tokens)
        cap = (idx >= tokens - caption)[None]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.where(cap, ids, -100), "vision_mask": ((idx >= 16) & (idx < 16 + vision))[None],
                    "caption_mask": cap})
    return out


def baseline(model, adapter, samples, device):
    """One sample at a time, weight gradients on, the model's own caption loss."""
    for p in model.parameters():
        p.requires_grad_(True)
    sums = {}

    def hook(i):
        def h(module, args, output):
            output.register_hook(lambda g: sums.__setitem__(i, sums.get(i, 0) + g.abs().mean()))
        return h

    handles = [layer.mlp.down_proj.register_forward_hook(hook(i)) for i, layer in enumerate(adapter.layers(model))]
    for s in samples:
        batch = {k: v.to(device) for k, v in s.items() if k in ("input_ids", "attention_mask", "labels")}
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    for p in model.parameters():
        p.requires_grad_(False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=640)
    ap.add_argument("--batch-sizes", default="1,2,4")
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = "cuda"
    adapter = get_adapter("qwen2_vl")
    model = build_model(args.shape, args.layers, device)
    samples = samples_for(args.samples, args.tokens, 152064)
    result = {"settings": vars(args), "env": environment(),
              "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, "ours": {}}
    gradient_stats(model, adapter, samples[:2], device, torch.bfloat16, batch_size=2)  # warm-up
    for bs in map(int, args.batch_sizes.split(",")):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t = {}
        with timer(t, "s"):
            gradient_stats(model, adapter, samples, device, torch.bfloat16, batch_size=bs)
        result["ours"][bs] = {"seconds": t["s"], "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30}
    if args.baseline:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t = {}
        with timer(t, "s"):
            baseline(model, adapter, samples, device)
        result["baseline"] = {"seconds": t["s"], "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30}
    sync()
    write_json(args.out, result)


if __name__ == "__main__":
    main()
