"""Peak GPU and host memory of every model stage vs model depth (72B-shaped decoder layers), layers streamed.

For each depth a Qwen2-VL folder is written: the parts outside the decoder layers (embeddings, LM head, final
norm, a one-block vision tower) with random weights, the last two decoder layers (the search chunk) random,
the others sparse files of zeros (no disk space; a zero layer passes its input through). Synthetic text inputs
(128 x 640 tokens by default; positions 16-271 counted as vision, the last 64 as caption) feed grads (MBQ
statistics), acts, the search of the last chunk, the pseudo export (random scales folded), eval_fp and eval.
Each stage runs in a fresh process (benchmarks/stages.py); with --search-cap-gib the chunk of the first depth
is searched again under that GPU memory cap, to compare its alphas with the uncapped run. Disk: the random
tensors (embeddings, LM head, two layers) plus the export (the whole model at that depth), removed after.

    python benchmarks/memory_depth.py --depths 8,16 --grads-store-mb 8192 --search-cap-gib 22 --out x.json
    python benchmarks/memory_depth.py --shape demo --depths 4,8 --samples 4 --tokens 96 --eval-samples 2 --out x.json
    python benchmarks/memory_depth.py --depths 4 --samples 128 --stages grads,acts,search --search-cap-gib 22 --out y.json

The JSON is written after every stage, so a run cut short keeps what it measured.
"""
import argparse
import json
import shutil
from pathlib import Path

import torch

import stages
from common import (environment, random_cache, random_layer, stage_jobs, text_config, write_inputs, write_json,
                    write_model_folder)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STAGES = ("grads", "acts", "search", "export", "eval_fp", "eval")


def model_config(shape, n_layers, vocab):
    import transformers

    cfg = text_config(shape, n_layers)
    text = cfg.to_dict()
    text.update(vocab_size=vocab, eos_token_id=vocab - 5, pad_token_id=vocab - 6)
    vision = dict(depth=1, embed_dim=64, hidden_size=cfg.hidden_size, num_heads=2, mlp_ratio=2)
    return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                      image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
                                      vision_end_token_id=vocab - 4)


def make_folder(root, shape, n_layers, chunk, vocab, dtype):
    """The model folder (see the module doc); returns its path."""
    def new_layer(device, seed):
        return random_layer(text_config(shape), device, dtype, seed)

    return write_model_folder(root, model_config(shape, n_layers, vocab), model_config(shape, 0, vocab),
                              "Qwen2VLForConditionalGeneration", new_layer, chunk, dtype, DEVICE)


def alphas(folder):
    from vlmquant.io.scales import load_layer

    return {p.name: load_layer(p)[0]["alpha"].tolist() for p in sorted(Path(folder).glob("layer_*.safetensors"))}


def depth_jobs(args, folder, n, capped=False):
    """[(label, job)] of every stage at one depth (capped: and the search under --search-cap-gib)."""
    memory = {"stream": args.stream, "grads_store_mb": args.grads_store_mb, "max_batch_mb": args.max_batch_mb}
    jobs = stage_jobs(folder, "qwen2_vl", args.dtype, memory, n)
    out = [(label, jobs[label]) for label in STAGES]
    if capped:
        out.insert(3, ("search_capped", {**jobs["search"], "cap_gib": args.search_cap_gib,
                                         "memory": {**memory, "max_batch_mb": None},
                                         "out": str(folder / "work/scales_capped")}))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="72b")
    ap.add_argument("--depths", default="8,16")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=640)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--dtype", default="bfloat16" if DEVICE == "cuda" else "float32")
    ap.add_argument("--stream", default="always")
    ap.add_argument("--grads-store-mb", type=int, default=None, help="memory.grads_store_mb (same cap at every depth)")
    ap.add_argument("--max-batch-mb", type=int, default=None, help="memory.max_batch_mb")
    ap.add_argument("--search-cap-gib", type=float, default=None, help="also search the chunk under this GPU cap")
    ap.add_argument("--stages", default=",".join(STAGES), help="the stages to run (those a stage reads run first)")
    ap.add_argument("--root", default="/tmp/memdepth")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    result = {"settings": vars(args), "env": environment(), "depths": {}}
    wanted = args.stages.split(",")
    for k, n in enumerate(map(int, args.depths.split(","))):
        capped = bool(args.search_cap_gib) and k == 0
        folder = Path(args.root) / f"{args.shape}-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        make_folder(folder, args.shape, n, [n - 2, n - 1], args.vocab, dtype)
        w = folder / "work"
        w.mkdir()
        write_inputs(w / "inputs.safetensors", args.samples, args.tokens, args.vocab)
        write_inputs(w / "eval_inputs.safetensors", args.eval_samples, args.tokens, args.vocab, seed=1)
        random_cache(w / "cache.pt", folder, "qwen2_vl")
        out = result["depths"][n] = {}
        for label, job in depth_jobs(args, folder, n, capped):
            if label.removesuffix("_capped") not in wanted:
                continue
            out[label] = stages.run(job, log=w / f"{label}.log")
            print(n, label, json.dumps(out[label]), flush=True)
            write_json(args.out, result, echo=False)
        if capped:
            out["search_alphas"], out["search_capped_alphas"] = alphas(w / "scales"), alphas(w / "scales_capped")
            out["capped_same_alpha"] = out["search_alphas"] == out["search_capped_alphas"]
        shutil.rmtree(folder)  # the export alone is the size of the model
    depths = list(result["depths"].values())
    if len(depths) == 2:
        a, b = depths
        result["ratio_deep_to_shallow"] = {
            stage: {"gpu": b[stage]["peak_gpu_gib"] / max(a[stage]["peak_gpu_gib"], 1e-9),
                    "host": b[stage]["peak_host_gib"] / a[stage]["peak_host_gib"]} for stage in a if stage in b}
    write_json(args.out, result)


if __name__ == "__main__":
    main()
