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
from common import environment, random_layer, text_config, write_json

DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32"}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STAGES = ("grads", "acts", "search", "export", "eval_fp", "eval")


def write_safetensors(path, shapes, dtype=torch.bfloat16, fill=None):
    """Header + data; data left as a sparse hole of zeros unless `fill` gives real tensors."""
    header, offset = {}, 0
    size = torch.tensor([], dtype=dtype).element_size()
    for name, shape in shapes.items():
        n = torch.Size(shape).numel() * size
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
                f.write(fill[name].to(dtype).contiguous().view(torch.uint8).cpu().numpy().tobytes())


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
    import transformers

    root.mkdir(parents=True, exist_ok=True)
    config = model_config(shape, n_layers, vocab)
    shell_cfg = model_config(shape, 0, vocab)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        shell = transformers.Qwen2VLForConditionalGeneration._from_config(shell_cfg, dtype=dtype)
    shell.save_pretrained(root / "shell", max_shard_size="1000GB")  # the non-layer tensors under the saved names
    del shell
    config.save_pretrained(root)
    (root / "shell/model.safetensors").rename(root / "shell.safetensors")
    shutil.rmtree(root / "shell")
    from safetensors import safe_open

    with safe_open(root / "shell.safetensors", "pt") as f:
        weight_map = {k: "shell.safetensors" for k in f.keys()}
    cfg = text_config(shape)
    proto = random_layer(cfg, "meta", dtype)
    shapes = {n: tuple(p.shape) for n, p in proto.named_parameters()}
    for i in range(n_layers):
        prefix = f"model.language_model.layers.{i}"
        file = f"layer-{i:05d}.safetensors"
        fill = None
        if i in chunk:
            layer = random_layer(cfg, DEVICE, dtype, seed=i)
            fill = {f"{prefix}.{n}": p.detach() for n, p in layer.named_parameters()}
            del layer
        write_safetensors(root / file, {f"{prefix}.{n}": s for n, s in shapes.items()}, dtype, fill=fill)
        weight_map.update({f"{prefix}.{n}": file for n in shapes})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def write_inputs(path, n, tokens, vocab, vision=256, caption=64, seed=0):
    """Synthetic text samples in the inputs file format (io.ragged), no image tokens."""
    from vlmquant.io import ragged

    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(tokens)
    samples = []
    for _ in range(n):
        ids = torch.randint(0, vocab - 8, (1, tokens), generator=g)
        cap = (idx >= tokens - caption)[None]
        samples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.where(cap, ids, -100),
                        "vision_mask": ((idx >= 16) & (idx < 16 + vision))[None], "caption_mask": cap})
    ragged.save(ragged.pack(samples), path, {"synthetic": True})


def random_cache(path, folder, seed=0):
    """A scale cache of random positive scales for every scale group of the model (built on the meta device)."""
    from vlmquant.io.scales import save_cache
    from vlmquant.models import get_adapter
    from vlmquant.models.loading import meta_model

    adapter = get_adapter("qwen2_vl")
    g = torch.Generator().manual_seed(seed)
    entries = []
    for i, layer in enumerate(adapter.layers(meta_model(adapter, folder))):
        for grp in adapter.resolve_groups(layer, i):
            n = layer.get_submodule(grp.linears[0]).in_features
            entries.append((f"layers.{i}.{grp.prev}", tuple(f"layers.{i}.{m}" for m in grp.linears),
                            torch.rand(n, generator=g) + 0.5))
    save_cache({"scale": entries}, path)


def alphas(folder):
    from vlmquant.io.scales import load_layer

    return {p.name: load_layer(p)[0]["alpha"].tolist() for p in sorted(Path(folder).glob("layer_*.safetensors"))}


def depth_jobs(args, folder, n, capped=False):
    """[(label, job)] of every stage at one depth (capped: and the search under --search-cap-gib)."""
    w = folder / "work"
    model = {"family": "qwen2_vl", "path": str(folder), "dtype": args.dtype}
    memory = {"stream": args.stream, "grads_store_mb": args.grads_store_mb, "max_batch_mb": args.max_batch_mb}
    base = {"model": model, "memory": memory, "device": "auto"}
    chunk = [n - 2, n - 1]
    run = {"run": "mbq", "run_config": {"method": "mbq", "w_bit": 4, "w_group": 128},
           "names": {"model": "m", "calib": "c", "run": "mbq"}}
    search = {**base, **run, "stage": "search", "inputs": str(w / "inputs.safetensors"), "start": str(w / "acts"),
              "grads": str(w / "grads.safetensors"), "layers": chunk, "out": str(w / "scales")}
    settings = {"batch_size": 4, "kl_top_k": 1000, "hidden_positions": 16}
    jobs = [
        ("grads", {**base, "stage": "grads", "inputs": str(w / "inputs.safetensors"), "out": str(w / "grads.safetensors")}),
        ("acts", {**base, "stage": "acts", "inputs": str(w / "inputs.safetensors"), "starts": [n - 2],
                  "out": str(w / "acts")}),
        ("search", search),
        ("export", {**base, **run, "stage": "export", "cache": str(w / "cache.pt"), "out": str(w / "checkpoint")}),
        ("eval_fp", {**base, "stage": "eval_fp", "inputs": str(w / "eval_inputs.safetensors"),
                     "ref": str(w / "fp.safetensors"), "table": str(w / "fp.parquet"), "settings": settings,
                     "ids": {"model": "m", "eval_calib": "e"}}),
        ("eval", {**base, "stage": "eval", "checkpoint": str(w / "checkpoint"), "inputs": str(w / "eval_inputs.safetensors"),
                  "ref": str(w / "fp.safetensors"), "table": str(w / "eval.parquet"), "settings": settings,
                  "ids": {"model": "m", "calib": "c", "run": "mbq", "eval_calib": "e"}}),
    ]
    if capped:
        jobs.insert(3, ("search_capped", {**search, "cap_gib": args.search_cap_gib, "memory": {**memory, "max_batch_mb": None},
                                          "out": str(w / "scales_capped")}))
    return jobs


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
        random_cache(w / "cache.pt", folder)
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
