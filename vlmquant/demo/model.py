"""Tiny random-init VLMs of real architectures, built offline for the demo.

Each family's demo config and processor come from its adapter (Adapter.demo, with the shared parts
in vlmquant/models/tiny.py): transformers' own model, processor and tokenizer classes, so the saved
folder loads like any Hugging Face checkpoint. Weights are random (seeded).
"""
import json
from pathlib import Path

import torch
import transformers

from vlmquant.io.atomic import atomic_dir
from vlmquant.models import get_adapter


def make_demo_model(family="qwen2_vl", seed=0):
    """A tiny random-init VLM of `family` and its processor, in memory: (model, processor).

    Weights depend only on `seed`; the global torch RNG is left as it was.
    """
    adapter = get_adapter(family)
    config, processor = adapter.demo()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, adapter.model_class)(config)
    tokenizer = processor.tokenizer
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return model.eval(), processor


def build_demo_model(out_dir, family="qwen2_vl", seed=0):
    """Save `make_demo_model(family, seed)` as a Hugging Face folder at `out_dir`; returns its Path.

    The folder holds config.json, model.safetensors, generation_config.json, the tokenizer, the
    processor config and the chat template; the same seed gives byte-identical files. The model
    loads with AutoModelForImageTextToText, the processor with AutoProcessor where torchvision is
    installed and otherwise with vlmquant.models.processing.load_processor.
    """
    model, processor = make_demo_model(family, seed)
    video = get_adapter(family).video_processor
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if video:
            path = tmp / "processor_config.json"
            processor_config = json.loads(path.read_text())
            processor_config["video_processor"] = {"video_processor_type": video}
            path.write_text(json.dumps(processor_config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)
