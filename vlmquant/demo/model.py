"""Tiny random-init VLMs of real architectures, built offline for the demo.

Each family uses transformers' own model, processor and tokenizer classes, so the saved folder
loads like any Hugging Face checkpoint. Weights are random (seeded); the tokenizer is a
byte-level BPE trained on the demo captions and corpus.
"""
import functools
import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from vlmquant.demo.dataset import SPLITS, load_captions, load_corpus
from vlmquant.errors import VlmquantError
from vlmquant.io.atomic import atomic_dir
from vlmquant.models.processing import image_only

DEMO_PROMPT = "Describe this image."
SYSTEM_PROMPT = "You are a helpful assistant."
PROMPTS = (DEMO_PROMPT, SYSTEM_PROMPT, "What is in this picture?", "Write a short caption for this photo.",
           "Answer the question using a single word or phrase.")
BPE_VOCAB_SIZE = 1536  # byte alphabet + merges; special tokens come on top

# the text model of every family: 4 layers, width 256, MLP 768, 4 query and 4 key/value heads
TEXT_SIZES = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=4096)
VISION_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)

QWEN_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>")

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
    """ChatML template (Qwen style) with a default system turn. The assistant's reply, up to and
    including <|im_end|>, is marked with {% generation %} for return_assistant_tokens_mask."""
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


# LLaVA-1.5 conversation style: "USER: <image>\nprompt ASSISTANT: reply</s>"
LLAVA_TEMPLATE = (
    RENDER_MACRO.replace("IMAGE", "<image>\n")
    + "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ render(message['content']) }} "
    "{% elif message['role'] == 'user' %}USER: {{ render(message['content']) }} "
    "{% else %}ASSISTANT: {% generation %}{{ render(message['content']) }}{{ eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


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


def qwen_tokenizer():
    return make_tokenizer(QWEN_TOKENS, eos="<|im_end|>", pad="<|endoftext|>")


def qwen_vision_ids(tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def qwen_text_config(tokenizer):
    # head_dim 64: the three M-RoPE sections (time, height, width) cover its 32 frequencies
    return dict(vocab_size=len(tokenizer), **TEXT_SIZES, bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6})


def qwen_image_processor():
    # 56x56 to 224x224 pixels: 4 to 64 merged tokens per image
    return transformers.Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 224 * 224})


def qwen2_vl():
    tokenizer = qwen_tokenizer()
    config = transformers.Qwen2VLConfig(
        text_config=qwen_text_config(tokenizer),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=TEXT_SIZES["hidden_size"], num_heads=4,
                           mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        tie_word_embeddings=False, **qwen_vision_ids(tokenizer))
    processor = image_only(transformers.Qwen2VLProcessor)(
        image_processor=qwen_image_processor(), tokenizer=tokenizer,
        chat_template=chatml_template("<|vision_start|><|image_pad|><|vision_end|>"))
    return transformers.Qwen2VLForConditionalGeneration, config, processor


def qwen2_5_vl():
    tokenizer = qwen_tokenizer()
    config = transformers.Qwen2_5_VLConfig(
        text_config=qwen_text_config(tokenizer),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                           out_hidden_size=TEXT_SIZES["hidden_size"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1]),
        tie_word_embeddings=False, **qwen_vision_ids(tokenizer))
    processor = image_only(transformers.Qwen2_5_VLProcessor)(
        image_processor=qwen_image_processor(), tokenizer=tokenizer,
        chat_template=chatml_template("<|vision_start|><|image_pad|><|vision_end|>"))
    return transformers.Qwen2_5_VLForConditionalGeneration, config, processor


def llava():
    tokenizer = make_tokenizer(("<s>", "</s>", "<pad>", "<image>"), bos="<s>", eos="</s>", pad="<pad>")
    # LLaVA-1.5: CLIP features of the second-to-last layer without CLS, 112/14 = 8x8 = 64 tokens
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION_SIZES, image_size=112, patch_size=14),
        text_config=transformers.LlamaConfig(
            vocab_size=len(tokenizer), **TEXT_SIZES, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-2, tie_word_embeddings=False)
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 112},
                                                         crop_size={"height": 112, "width": 112})
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    return transformers.LlavaForConditionalGeneration, config, processor


def llava_onevision():
    tokenizer = make_tokenizer(QWEN_TOKENS[:3] + ("<image>", "<video>"), eos="<|im_end|>", pad="<|endoftext|>")
    # SigLIP on 56x56 tiles (4x4 = 16 tokens each), AnyRes grids of up to 2x2 tiles
    pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]
    config = transformers.LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", **VISION_SIZES, image_size=56, patch_size=14),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), **TEXT_SIZES, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False)
    image_processor = transformers.LlavaOnevisionImageProcessorPil(size={"height": 56, "width": 56},
                                                                   image_grid_pinpoints=pinpoints)
    processor = image_only(transformers.LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=16,
        vision_feature_select_strategy="full", chat_template=chatml_template("<image>\n"))
    return transformers.LlavaOnevisionForConditionalGeneration, config, processor


def internvl():
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tokenizer = make_tokenizer(QWEN_TOKENS[:3] + tuple(named.values()), eos="<|im_end|>", pad="<|endoftext|>",
                               named=named)
    # InternViT on 112x112 tiles: 8x8 patches, pixel-shuffled by 0.5 to 4x4 = 16 tokens per tile;
    # an image becomes up to 4 tiles plus a thumbnail
    config = transformers.InternVLConfig(
        vision_config=dict(**VISION_SIZES, image_size=[112, 112], patch_size=[14, 14]),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), **TEXT_SIZES, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        image_token_id=tokenizer.context_image_token_id, image_seq_length=16, downsample_ratio=0.5,
        tie_word_embeddings=False)
    image_processor = transformers.GotOcr2ImageProcessorPil(size={"height": 112, "width": 112},
                                                            crop_to_patches=True, max_patches=4)
    processor = image_only(transformers.InternVLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=16,
        chat_template=chatml_template("<IMG_CONTEXT>\n"))
    return transformers.InternVLForConditionalGeneration, config, processor


FAMILIES = {"qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl, "llava": llava,
            "llava_onevision": llava_onevision, "internvl": internvl}
# video processors that AutoProcessor builds where torchvision is installed (LLaVA-1.5 has none)
VIDEO_PROCESSORS = {"qwen2_vl": "Qwen2VLVideoProcessor", "qwen2_5_vl": "Qwen2VLVideoProcessor",
                    "llava_onevision": "LlavaOnevisionVideoProcessor", "internvl": "InternVLVideoProcessor"}


def make_demo_model(family="qwen2_vl", seed=0):
    """A tiny random-init VLM of `family` and its processor, in memory: (model, processor).

    Weights depend only on `seed`; the global torch RNG is left as it was.
    """
    if family not in FAMILIES:
        raise VlmquantError(f"demo model: unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    model_class, config, processor = FAMILIES[family]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
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
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if family in VIDEO_PROCESSORS:
            path = tmp / "processor_config.json"
            processor_config = json.loads(path.read_text())
            processor_config["video_processor"] = {"video_processor_type": VIDEO_PROCESSORS[family]}
            path.write_text(json.dumps(processor_config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)
