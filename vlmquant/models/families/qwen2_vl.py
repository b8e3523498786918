"""Qwen2-VL: a ViT with 2x2 patch merging feeding a Qwen2 decoder (M-RoPE)."""
import transformers

from vlmquant.models.base import Adapter
from vlmquant.models.processing import image_only
from vlmquant.models.tiny import TEXT_SIZES, chatml_template, make_tokenizer

QWEN_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


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


class Qwen2VL(Adapter):
    model_class = "Qwen2VLForConditionalGeneration"
    processor_class = "Qwen2VLProcessor"
    video_processor = "Qwen2VLVideoProcessor"

    def demo(self):
        tokenizer = qwen_tokenizer()
        config = transformers.Qwen2VLConfig(
            text_config=qwen_text_config(tokenizer),
            vision_config=dict(depth=2, embed_dim=64, hidden_size=TEXT_SIZES["hidden_size"], num_heads=4,
                               mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
            tie_word_embeddings=False, **qwen_vision_ids(tokenizer))
        processor = image_only(transformers.Qwen2VLProcessor)(
            image_processor=qwen_image_processor(), tokenizer=tokenizer, chat_template=chatml_template(QWEN_IMAGE))
        return config, processor


ADAPTER = Qwen2VL()
