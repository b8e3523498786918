"""Tiny random-init VLMs of real architectures, built offline for the demo.

Each family's demo config and processor come from its adapter (Adapter.demo): transformers' own
model, processor and tokenizer classes, so a saved folder loads like any Hugging Face checkpoint.
Here: what the families share (sizes, a real tokenizer class over a byte-level BPE trained on the
demo texts, chat templates) and the builders. Weights are random (seeded).
"""
import functools
import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from vlmquant.demo.dataset import SPLITS, load_captions, load_corpus
from vlmquant.io.atomic import atomic_dir
from vlmquant.models import get_adapter

DEMO_PROMPT = "Describe this image."
SYSTEM_PROMPT = "You are a helpful assistant."
PROMPTS = (DEMO_PROMPT, SYSTEM_PROMPT, "What is in this picture?", "Write a short caption for this photo.",
           "Answer the question using a single word or phrase.")
BPE_VOCAB_SIZE = 1536  # byte alphabet + merges; special tokens come on top

# the text model of every family: 4 layers, width 256, MLP 768, 4 query and 4 key/value heads
TEXT_SIZES = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=4096)
VISION_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)

# jinja macro shared by the templates: a message's content as text, images as IMAGE. No
# whitespace control and no literal newline right after a tag: transformers renders chat
# templates with trim_blocks, which drops such newlines.
RENDER_MACRO = (
    "{% macro render(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for part in content %}"
    "{% if part['type'] == 'image' %}IMAGE{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}")


def chatml_template(image):
    """ChatML template (Qwen style) with a default system turn; `image` is what an image part renders as.
    The assistant's reply, up to and including <|im_end|>, is marked with {% generation %} for
    return_assistant_tokens_mask."""
    return (RENDER_MACRO.replace("IMAGE", image)
            + "{% for message in messages %}"
            "{% if loop.first and message['role'] != 'system' %}"
            "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
            "{% endif %}"
            "<|im_start|>{{ message['role'] }}\n"
            "{% if message['role'] == 'assistant' %}"
            "{% generation %}{{ render(message['content']) }}<|im_end|>{% endgeneration %}"
            "{% else %}{{ render(message['content']) }}<|im_end|>{% endif %}"
            "{{ '\\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@functools.lru_cache(maxsize=1)
def train_bpe():
    """Byte-level BPE trained on the demo captions, corpus and prompts: (vocab, merges)."""
    texts = list(PROMPTS) + load_corpus()
    for split in SPLITS:
        texts += [a["caption"] for a in load_captions(split)["annotations"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(pair) for pair in model["merges"]]


def make_tokenizer(specials, eos, pad, bos=None, named=None):
    """Qwen2Tokenizer over the demo BPE, with `specials` appended to the vocabulary in order.

    `named` maps tokenizer attributes (e.g. "context_image_token") to special tokens; the
    other specials are plain extra special tokens.
    """
    vocab, merges = train_bpe()
    vocab = dict(vocab)
    for token in specials:
        vocab[token] = len(vocab)
    named = named or {}
    extras = [t for t in specials if t not in (bos, eos, pad) and t not in named.values()]
    tokenizer = transformers.Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=bos, eos_token=eos, pad_token=pad,
        extra_special_tokens=named or extras, model_max_length=TEXT_SIZES["max_position_embeddings"])
    if named:
        tokenizer.add_tokens(extras, special_tokens=True)
    return tokenizer


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
