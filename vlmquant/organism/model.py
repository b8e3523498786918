"""The organism's architecture: a small Qwen2-VL whose decoder widths are multiples of 128.

Text: 4 layers, hidden 256, MLP 768, 4 heads of 64 (M-RoPE sections 8/12/12 cover the 32
frequencies). Vision: 3 blocks of width 128, patch 14, 2x2 merge into width 256. The tokenizer
is a byte-level BPE trained on the task's own words, wrapped in transformers' Qwen2Tokenizer;
the processor is Qwen2-VL's (image-only where torchvision is missing), with a ChatML template
whose assistant turn is marked by {% generation %}. About 4.8 million parameters, 9.6 MB in bf16.
"""
import functools
import json
import shutil
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from vlmquant.errors import VlmquantError
from vlmquant.io.atomic import atomic_dir
from vlmquant.models import get_adapter
from vlmquant.models.families.qwen2_vl import QWEN_TOKENS, qwen_image_processor, qwen_vision_ids
from vlmquant.models.processing import image_only
from vlmquant.models.tiny import SYSTEM_PROMPT, chatml_template
from vlmquant.organism import MODEL_DIR, task

BPE_VOCAB_SIZE = 512  # byte alphabet + merges; the task's words need fewer, so training stops early
TEXT_SIZES = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=1024)
VISION_SIZES = dict(depth=3, embed_dim=128, num_heads=4, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2)
IMAGE_TEMPLATE = "<|vision_start|><|image_pad|><|vision_end|>"
FAMILY = "qwen2_vl"


def task_texts():
    """Every question, answer and caption phrase the task can produce, plus the fixed prompts."""
    texts = [SYSTEM_PROMPT, task.CAPTION_PROMPT, task.POST_PROMPT, "user", "assistant", "system"]
    for colour in task.COLOURS:
        for shape in task.SHAPES:
            for pos in task.POSITIONS:
                texts += [f"What colour is the {shape}? What colour is the shape in the {pos}? {colour}",
                          f"What shape is the {colour} one? {shape}",
                          f"Where is the {colour} {shape}? {pos}",
                          f"a {colour} {shape} at the {pos}, and"]
    for shape in task.SHAPES:
        texts.append(f"How many {task.PLURALS[shape]} are there? How many shapes are there?")
    texts += [" ".join(task.NUMBERS).title() + " shape shapes: 0 1 2 3 4"]
    # answers open the assistant turn without a leading space
    texts += [*task.COLOURS, *task.SHAPES, *task.POSITIONS, *(n.capitalize() for n in task.NUMBERS)]
    return texts


@functools.lru_cache(maxsize=1)
def train_bpe():
    """Byte-level BPE trained on task_texts(): (vocab, merges)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(task_texts(), trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(pair) for pair in model["merges"]]


def make_tokenizer():
    """Qwen2Tokenizer over the task BPE plus Qwen's special tokens (eos <|im_end|>, pad <|endoftext|>)."""
    vocab, merges = train_bpe()
    vocab = dict(vocab)
    for token in QWEN_TOKENS:
        vocab[token] = len(vocab)
    extras = [t for t in QWEN_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")]
    return transformers.Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", extra_special_tokens=extras,
        model_max_length=TEXT_SIZES["max_position_embeddings"])


def make_processor():
    return image_only(transformers.Qwen2VLProcessor)(image_processor=qwen_image_processor(), tokenizer=make_tokenizer(),
                                                     chat_template=chatml_template(IMAGE_TEMPLATE))


def make_config(tokenizer):
    text = dict(vocab_size=len(tokenizer), **TEXT_SIZES, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e4})
    return transformers.Qwen2VLConfig(text_config=text,
                                      vision_config=dict(**VISION_SIZES, hidden_size=TEXT_SIZES["hidden_size"]),
                                      tie_word_embeddings=False, **qwen_vision_ids(tokenizer))


def build_organism(seed=0):
    """The untrained organism: (Qwen2VLForConditionalGeneration in fp32, processor).

    Weights depend only on `seed`; the global torch RNG is left as it was.
    """
    processor = make_processor()
    config = make_config(processor.tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen2VLForConditionalGeneration(config)
    model.generation_config = generation_config(processor.tokenizer)
    return model.eval(), processor


def generation_config(tokenizer):
    return transformers.GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                         do_sample=False)


def save_organism(model, processor, out_dir):
    """Save as a Hugging Face folder (weights in bf16) atomically; returns the Path."""
    with atomic_dir(out_dir) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)


def load_organism(path, device="cpu", dtype=torch.float32):
    """A model folder of the organism's family (the organism, or a checkpoint of it): (model on `device`
    in `dtype`, processor), loaded by the qwen2_vl adapter. Raises VlmquantError for a folder without
    config.json or of another family."""
    adapter = get_adapter(FAMILY)
    return adapter.load_model(path, dtype, device), adapter.load_processor(path)


def copy_organism(out_dir):
    """Copy the trained organism shipped in the package (MODEL_DIR) to `out_dir`, atomically; returns the Path."""
    with atomic_dir(out_dir) as tmp:
        for f in sorted(MODEL_DIR.iterdir()):
            shutil.copy2(f, tmp / f.name)
    return Path(out_dir)


def adopt(src_dir, out_dir):
    """Save the weights of the organism folder `src_dir` (config.json and model.safetensors, e.g.
    written by another transformers version) with this version's config, tokenizer and processor.

    Raises VlmquantError if its config differs from make_config's in a field the weights depend on.
    """
    processor = make_processor()
    expected = make_config(processor.tokenizer)
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(src_dir, dtype=torch.bfloat16)
    for part in ("text_config", "vision_config"):
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "embed_dim", "depth"):
            got, want = getattr(getattr(model.config, part), key, None), getattr(getattr(expected, part), key, None)
            if got != want:
                raise VlmquantError(f"{src_dir}/config.json: {part}.{key} is {got}, the organism has {want}")
    fresh = transformers.Qwen2VLForConditionalGeneration(expected)
    fresh.load_state_dict(model.state_dict())  # strict: the same tensor names and shapes
    fresh.generation_config = generation_config(processor.tokenizer)
    return save_organism(fresh, processor, out_dir)
