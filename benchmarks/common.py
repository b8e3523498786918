"""Shared pieces of the benchmarks: random-init decoder layers of real shapes, model folders of them with sparse
layers, synthetic inputs and scale caches, timers, JSON out."""
import json
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from transformers.models.qwen2_vl import modeling_qwen2_vl as qm

REPO = Path(__file__).resolve().parents[1]

SHAPES = {  # Qwen2-VL text models
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
               mrope_section=[16, 24, 24]),
    "72b": dict(hidden_size=8192, intermediate_size=29568, num_attention_heads=64, num_key_value_heads=8,
                mrope_section=[16, 24, 24]),
    "demo": dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=4,
                 mrope_section=[8, 12, 12]),
}


QWEN3_SHAPES = {  # Qwen3-VL text models (config.json of the releases)
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "30b-a3b": dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                    num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
    "235b-a22b": dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=64, num_key_value_heads=4,
                      head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536),
    "demo": dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=4, head_dim=64),
    "demo-moe": dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                     num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128),
}


def text_config(shape, n_layers=1):
    s = dict(SHAPES[shape])
    section = s.pop("mrope_section")
    cfg = transformers.Qwen2VLTextConfig(
        **s, num_hidden_layers=n_layers, vocab_size=1024, bos_token_id=None, eos_token_id=None, pad_token_id=None, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e6})
    cfg._attn_implementation = "sdpa"
    return cfg


def random_layer(cfg, device, dtype, seed=0):
    torch.manual_seed(seed)
    with torch.device(device):
        layer = qm.Qwen2VLDecoderLayer(cfg, 0).to(dtype).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() == 2:
                p.normal_(0, 0.02)
            else:
                p.normal_(0, 0.01)
    return layer


def qwen3_text_config(shape, n_layers=1, **extra):
    """Qwen3-VL (or Qwen3-VL-MoE, every layer MoE) text config of `shape` (QWEN3_SHAPES), sdpa attention."""
    s = QWEN3_SHAPES[shape]
    moe = "num_experts" in s
    cls = transformers.Qwen3VLMoeTextConfig if moe else transformers.Qwen3VLTextConfig
    cfg = cls(**s, num_hidden_layers=n_layers, max_position_embeddings=32768, rms_norm_eps=1e-6,
              **({"decoder_sparse_step": 1} if moe else {}), **{"vocab_size": 1024, **extra})
    cfg._attn_implementation = "sdpa"
    if moe:
        cfg._experts_implementation = "grouped_mm"
    return cfg


def qwen3_layer(shape, device, dtype, seed=0):
    """(layer, config): a Qwen3-VL (or Qwen3-VL-MoE) text decoder layer of `shape`, random weights."""
    cfg = qwen3_text_config(shape)
    if "num_experts" in QWEN3_SHAPES[shape]:
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextDecoderLayer as Layer
    else:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer as Layer
    torch.manual_seed(seed)
    with torch.device(device):
        layer = Layer(cfg, 0).to(dtype).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.1)  # a router with uneven expert loads
            else:
                p.normal_(0, 0.02)
    return layer, cfg


def layer_inputs(cfg, samples, tokens, device, dtype, vision=256, caption=64, seed=1):
    """Hidden states with a few outlier channels, layer kwargs and vision/caption masks."""
    g = torch.Generator(device=device).manual_seed(seed)
    C = cfg.hidden_size
    hidden = torch.randn(samples, tokens, C, device=device, dtype=dtype, generator=g)
    outliers = torch.randperm(C, generator=torch.Generator().manual_seed(seed))[: C // 100].to(device)
    hidden[..., outliers] *= 20
    pos = torch.arange(tokens, device=device).expand(3, samples, tokens)
    rotary = qm.Qwen2VLRotaryEmbedding(config=cfg).to(device)
    cos, sin = rotary(hidden, pos)
    kwargs = {"position_embeddings": (cos.to(dtype), sin.to(dtype)), "position_ids": pos}
    idx = torch.arange(tokens, device=device)
    vis = ((idx >= 16) & (idx < 16 + vision)).expand(samples, tokens)
    cap = (idx >= tokens - caption).expand(samples, tokens)
    masks = {"valid": torch.ones(samples, tokens, dtype=torch.bool, device=device), "vis": vis, "cap": cap}
    return hidden, kwargs, masks


# --- model folders with sparse layers, synthetic inputs, scale caches ----------------------------------------
DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32"}


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


def write_model_folder(root, config, shell_config, model_class, new_layer, chunk, dtype, device):
    """A model folder of `config` (transformers `model_class`): the parts outside the decoder layers saved by
    save_pretrained from a model of `shell_config` (no decoder layers) built on `device`, random; decoder layer
    i in layer-{i:05d}.safetensors under the names the layer module holds, random (new_layer(device, seed=i))
    for i in `chunk`, a sparse file of zeros (no disk space; a zero layer passes its input through) for the
    others. Returns root."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with torch.device(device):
        shell = getattr(transformers, model_class)._from_config(shell_config, dtype=dtype)
    shell.save_pretrained(root / "shell", max_shard_size="1000GB")  # the non-layer tensors under the saved names
    del shell
    config.save_pretrained(root)
    (root / "shell/model.safetensors").rename(root / "shell.safetensors")
    shutil.rmtree(root / "shell")
    from safetensors import safe_open

    with safe_open(root / "shell.safetensors", "pt") as f:
        weight_map = {k: "shell.safetensors" for k in f.keys()}
    shapes = {n: tuple(p.shape) for n, p in new_layer("meta", seed=0).named_parameters()}
    for i in range(config.get_text_config().num_hidden_layers):
        prefix = f"model.language_model.layers.{i}"
        file = f"layer-{i:05d}.safetensors"
        fill = None
        if i in chunk:
            layer = new_layer(device, seed=i)
            fill = {f"{prefix}.{n}": p.detach() for n, p in layer.named_parameters()}
            del layer
        write_safetensors(root / file, {f"{prefix}.{n}": s for n, s in shapes.items()}, dtype, fill=fill)
        weight_map.update({f"{prefix}.{n}": file for n in shapes})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def write_inputs(path, n, tokens, vocab, vision=256, caption=64, seed=0):
    """Synthetic text samples in the inputs file format (io.ragged), no image tokens; positions 16 to 16 + vision
    counted as vision, the last `caption` as caption."""
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


def random_cache(path, folder, family, seed=0):
    """A scale cache of random positive scales for every scale group of the model of `family` (built on the meta
    device): (C,) per group, (E, C) per per-expert group."""
    from vlmquant.io.scales import save_cache
    from vlmquant.models import get_adapter
    from vlmquant.models.base import in_width, layer_part
    from vlmquant.models.loading import meta_model

    adapter = get_adapter(family)
    g = torch.Generator().manual_seed(seed)
    entries = []
    for i, layer in enumerate(adapter.layers(meta_model(adapter, folder))):
        for grp in adapter.resolve_groups(layer, i):
            consumer = layer_part(layer, grp.linears[0])
            shape = (consumer.shape[0], in_width(consumer)) if grp.experts else (in_width(consumer),)
            entries.append((f"layers.{i}.{grp.prev}", tuple(f"layers.{i}.{m}" for m in grp.consumers),
                            torch.rand(shape, generator=g) + 0.5))
    save_cache({"scale": entries}, path)


def stage_jobs(folder, family, dtype, memory, n):
    """{label: stages.py job} of every model stage of an MBQ W4 g128 run on the model folder of `family` with `n`
    decoder layers, whose work folder (folder/work) holds inputs.safetensors, eval_inputs.safetensors and a scale
    cache cache.pt: fingerprint (the weights fingerprint every later job looks up, as in the workflow), grads, acts
    (the inputs of layer n - 2), search (the chunk of layers n - 2 and n - 1), export (pseudo) and pack
    (compressed-tensors) of the scale cache, eval_fp and eval (of the scale cache). memory: the config's memory
    block."""
    w = folder / "work"
    base = {"model": {"family": family, "path": str(folder), "dtype": dtype}, "memory": memory, "device": "auto",
            "fingerprints": str(w / "fingerprints.json")}
    run = {"run": "mbq", "run_config": {"method": "mbq", "w_bit": 4, "w_group": 128},
           "names": {"model": "m", "calib": "c", "run": "mbq"}}
    inputs, eval_inputs = str(w / "inputs.safetensors"), str(w / "eval_inputs.safetensors")
    settings = {"batch_size": 4, "kl_top_k": 1000, "hidden_positions": 16}
    return {
        "fingerprint": {**base, "stage": "fingerprint"},
        "grads": {**base, "stage": "grads", "inputs": inputs, "out": str(w / "grads.safetensors")},
        "acts": {**base, "stage": "acts", "inputs": inputs, "starts": [n - 2], "out": str(w / "acts")},
        "search": {**base, **run, "stage": "search", "inputs": inputs, "start": str(w / "acts"),
                   "grads": str(w / "grads.safetensors"), "layers": [n - 2, n - 1], "out": str(w / "scales")},
        "export": {**base, **run, "stage": "export", "cache": str(w / "cache.pt"), "out": str(w / "checkpoint")},
        "pack": {**base, **run, "stage": "pack", "cache": str(w / "cache.pt"), "out": str(w / "packed")},
        "eval_fp": {**base, "stage": "eval_fp", "inputs": eval_inputs, "ref": str(w / "fp.safetensors"),
                    "table": str(w / "fp.parquet"), "settings": settings, "ids": {"model": "m", "eval_calib": "e"}},
        "eval": {**base, **run, "stage": "eval", "cache": str(w / "cache.pt"), "inputs": eval_inputs,
                 "ref": str(w / "fp.safetensors"), "table": str(w / "eval.parquet"), "settings": settings,
                 "ids": {"model": "m", "calib": "c", "run": "mbq", "eval_calib": "e"}},
    }


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def timer(out, key):
    sync()
    t = time.perf_counter()
    yield
    sync()
    out[key] = out.get(key, 0.0) + time.perf_counter() - t


def time_search(search_layer, repeats, *args):
    """(results of the last run, seconds of each of `repeats` runs) of search_layer(*args), after one warm-up."""
    search_layer(*args)
    times = []
    for _ in range(repeats):
        t = {}
        with timer(t, "s"):
            results, _ = search_layer(*args)
        times.append(t["s"])
    return results, times


def environment():
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "cpu_count": __import__("os").cpu_count()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpus"] = torch.cuda.device_count()
    return env


def write_json(path, data, echo=True):
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    if echo:
        print(json.dumps(data, indent=2, sort_keys=True))


def run_workflow(work, configfiles=(), targets=(), cores="all", quiet=False):
    """This checkout's workflow in the folder `work` (created; the checkout's config.yaml copied in), with the extra
    --configfile files and targets (none: the default target); returns its wall seconds. Raises CalledProcessError
    when Snakemake fails."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "config.yaml", work / "config.yaml")
    cmd = [sys.executable, "-m", "snakemake", *map(str, targets), "-s", str(REPO / "Snakefile"), "-d", str(work),
           "--cores", str(cores), *(["--quiet", "all"] if quiet else [])]
    cmd += ["--configfile", *map(str, configfiles)] if configfiles else []
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start
