"""Peak GPU and host memory of a search job vs model depth (72B-shaped layers).

For each depth, a model folder is written whose safetensors hold one shard per decoder
layer; only the searched chunk's layers get random data, the rest are sparse files of zeros
(no disk space). A fresh process then loads the chunk's layers lazily and searches them.

    python benchmarks/memory_depth.py --depths 8,16 --out x.json
"""
import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from common import environment, sync, layer_inputs, text_config, write_json

DTYPES = {torch.bfloat16: "BF16"}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def write_safetensors(path, shapes, dtype=torch.bfloat16, fill=None):
    """Header + data; data left as a sparse hole of zeros unless `fill` gives real tensors."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = torch.Size(shape).numel() * 2
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        start = f.tell()
        if fill is None:
            f.truncate(start + offset)
        else:
            for name in shapes:
                f.write(fill[name].contiguous().view(torch.uint8).cpu().numpy().tobytes())


def make_folder(root, shape, n_layers, chunk):
    import transformers
    from common import random_layer

    root.mkdir(parents=True, exist_ok=True)
    cfg = text_config(shape, n_layers)
    vision = dict(depth=1, embed_dim=64, hidden_size=cfg.hidden_size, num_heads=2, mlp_ratio=2)
    full = transformers.Qwen2VLConfig(text_config=cfg.to_dict(), vision_config=vision)
    full.save_pretrained(root)
    weight_map = {}
    proto = random_layer(cfg, "meta", torch.bfloat16)
    shapes = {n: tuple(p.shape) for n, p in proto.named_parameters()}
    for i in range(n_layers):
        prefix = f"model.language_model.layers.{i}"
        file = f"layer-{i:05d}.safetensors"
        fill = None
        if i in chunk:
            layer = random_layer(cfg, DEVICE, torch.bfloat16, seed=i)
            fill = {f"{prefix}.{n}": p.detach() for n, p in layer.named_parameters()}
            del layer
        write_safetensors(root / file, {f"{prefix}.{n}": s for n, s in shapes.items()}, fill=fill)
        weight_map.update({f"{prefix}.{n}": file for n in shapes})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="72b")
    ap.add_argument("--depths", default="8,16")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=640)
    ap.add_argument("--root", default="/tmp/memdepth")
    ap.add_argument("--job", nargs=3, metavar=("FOLDER", "FIRST", "LAST"))
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.job:
        return run_job(args)
    result = {"settings": vars(args), "env": environment(), "depths": {}}
    for n in map(int, args.depths.split(",")):
        chunk = [n - 2, n - 1]
        folder = Path(args.root) / f"{args.shape}-{n}"
        make_folder(folder, args.shape, n, chunk)
        out = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--samples", str(args.samples),
                              "--tokens", str(args.tokens), "--job", str(folder), str(chunk[0]), str(chunk[1])],
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        result["depths"][n] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = (result["depths"][n] for n in map(int, args.depths.split(",")))
    result["gpu_ratio"] = b["peak_gpu_gib"] / max(a["peak_gpu_gib"], 1e-9)
    result["host_ratio"] = b["peak_host_gib"] / a["peak_host_gib"]
    write_json(args.out, result)


def run_job(args):
    import time

    from vlmquant.models import get_adapter
    from vlmquant.models.loading import load_layers
    from vlmquant.search.layer import search_layer
    from vlmquant.spec import RunSpec

    folder, first, last = args.job[0], int(args.job[1]), int(args.job[2])
    chunk = list(range(first, last + 1))
    adapter = get_adapter("qwen2_vl")
    t = time.perf_counter()
    layers = load_layers(adapter, folder, chunk, DEVICE, torch.bfloat16)
    sync()
    load_s = time.perf_counter() - t
    hidden, kwargs, masks = layer_inputs(text_config(args.shape), args.samples, args.tokens, DEVICE, torch.bfloat16)
    run = RunSpec.from_config("mbq", {"method": "mbq", "w_bit": 3, "w_group": 128})
    t = time.perf_counter()
    for i in chunk:
        layer = layers.pop(i)
        _, hidden = search_layer(layer, adapter.resolve_groups(layer, i), hidden, kwargs, masks, run,
                                 {"attn": 2.0, "mlp": 1.5})
        del layer
    sync()
    print(json.dumps({"layers": chunk, "load_seconds": load_s, "search_seconds_per_layer": (time.perf_counter() - t) / len(chunk),
                      "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0,
                      "peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


if __name__ == "__main__":
    main()
