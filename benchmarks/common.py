"""Shared pieces of the benchmarks: random-init decoder layers of real shapes, timers, JSON out."""
import json
import platform
import time
from contextlib import contextmanager

import torch
import transformers
from transformers.models.qwen2_vl import modeling_qwen2_vl as qm

SHAPES = {  # Qwen2-VL text models
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
               mrope_section=[16, 24, 24]),
    "72b": dict(hidden_size=8192, intermediate_size=29568, num_attention_heads=64, num_key_value_heads=8,
                mrope_section=[16, 24, 24]),
    "demo": dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=4,
                 mrope_section=[8, 12, 12]),
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
