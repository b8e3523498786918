"""Wall time of the search stage through Snakemake on 1 GPU vs N GPUs (one chunk job per GPU).

Builds a random-init Qwen2-VL model of a real text shape, writes synthetic model inputs
(samples x tokens, vision and caption positions marked), computes the boundary activations
once, then times `snakemake --resources gpu=N <scale cache>` for each N with a cold
torch.compile cache. Run on a machine with several GPUs:

    python benchmarks/parallel_chunks.py --gpus 1,4 --out x.json
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
import yaml

from common import SHAPES, environment, write_json
from vlmquant.io import ragged

REPO = Path(__file__).resolve().parents[1]


def build_model(path, shape, n_layers, device, vocab=4096):
    s = dict(SHAPES[shape])
    section = s.pop("mrope_section")
    text = dict(**s, num_hidden_layers=n_layers, vocab_size=vocab, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e6},
                bos_token_id=None, eos_token_id=None, pad_token_id=0)
    vision = dict(depth=1, embed_dim=64, hidden_size=s["hidden_size"], num_heads=2, mlp_ratio=2)
    cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 1,
                                     video_token_id=vocab - 2, vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 4)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen2VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="4GB")
    del model


def write_inputs(path, samples, tokens, vocab=4096, vision=256, caption=64):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(samples):
        ids = torch.randint(0, vocab - 8, (1, tokens), generator=g)
        idx = torch.arange(tokens)[None]
        cap = idx >= tokens - caption
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.where(cap, ids, -100),
                     "vision_mask": (idx >= 16) & (idx < 16 + vision), "caption_mask": cap})
    ragged.save(ragged.pack(rows), path, {"synthetic": True})


def snakemake(work, *args):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work), "--cores", "16", *args, "--rerun-triggers", "mtime"]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stdout[-3000:] + res.stderr[-5000:])
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--layers-per-job", type=int, default=7)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=640)
    ap.add_argument("--gpus", default="1,4")
    ap.add_argument("--work", default="/tmp/parallel")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "src/images").mkdir(parents=True)
    build_model(work / "model", args.shape, args.layers, args.device)
    # the calibration stage is replaced by synthetic inputs: its sources and output exist, older
    (work / "src/captions.json").write_text("{}")
    (work / "results/calib").mkdir(parents=True)
    (work / "results/calib/syn.parquet").write_bytes(b"")
    old = time.time() - 3600
    for i, p in enumerate((work / "src/captions.json", work / "src/images", work / "results/calib/syn.parquet")):
        os.utime(p, (old + i, old + i))
    write_inputs(work / "results/big/syn/inputs.safetensors", args.samples, args.tokens)
    config = {
        "device": args.device,
        "models": {"big": {"family": "qwen2_vl", "path": str(work / "model"), "dtype": "bfloat16" if args.device == "cuda" else "float32"}},
        "calib": {"syn": {"source": "coco", "captions": str(work / "src/captions.json"), "images": str(work / "src/images"),
                          "n_samples": args.samples},
                  "held": {"source": "coco", "captions": str(work / "src/captions.json"), "images": str(work / "src/images"),
                           "n_samples": 1}},
        "eval": {"calib": "held"},
        "runs": {"awq": {"method": "awq", "w_bit": 3, "w_group": 128}},
        "search": {"layers_per_job": args.layers_per_job},
        "targets": {"models": ["big"], "calib": ["syn"], "runs": ["awq"]},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    target = "results/big/syn/awq/scale_cache.pt"
    result = {"settings": vars(args), "env": environment(),
              "acts_seconds": snakemake(work, "results/big/syn/acts", "--resources", "gpu=1"), "search_seconds": {}}
    for n in map(int, args.gpus.split(",")):
        shutil.rmtree(work / "results/big/syn/awq", ignore_errors=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / f"inductor-{n}")  # every setting starts cold
        result["search_seconds"][n] = snakemake(work, target, "--resources", f"gpu={n}")
        result[f"cache_sha256_{n}"] = __import__("hashlib").sha256((work / target).read_bytes()).hexdigest()
    ns = list(map(int, args.gpus.split(",")))
    result["speedup"] = result["search_seconds"][ns[0]] / result["search_seconds"][ns[-1]]
    write_json(args.out, result)


if __name__ == "__main__":
    main()
