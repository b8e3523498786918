"""Qwen2.5-VL: Qwen2-VL with a windowed-attention ViT (SwiGLU, RMSNorm) feeding the Qwen2 decoder."""
import transformers

from vlmquant.models.base import Adapter
from vlmquant.models.families.qwen2_vl import (QWEN_IMAGE, qwen_image_processor, qwen_text_config, qwen_tokenizer,
                                               qwen_vision_ids)
from vlmquant.models.processing import image_only
from vlmquant.models.tiny import TEXT_SIZES, chatml_template


class Qwen25VL(Adapter):
    model_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = "Qwen2_5_VLProcessor"
    video_processor = "Qwen2VLVideoProcessor"

    def demo(self):
        tokenizer = qwen_tokenizer()
        config = transformers.Qwen2_5_VLConfig(
            text_config=qwen_text_config(tokenizer),
            vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                               out_hidden_size=TEXT_SIZES["hidden_size"], patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1]),
            tie_word_embeddings=False, **qwen_vision_ids(tokenizer))
        processor = image_only(transformers.Qwen2_5_VLProcessor)(
            image_processor=qwen_image_processor(), tokenizer=tokenizer, chat_template=chatml_template(QWEN_IMAGE))
        return config, processor


ADAPTER = Qwen25VL()
