"""LLaVA-1.5: CLIP ViT features (second-to-last layer, CLS dropped) projected into a Llama decoder.

Prompts read "USER: <image>\\nprompt ASSISTANT: caption", so a caption's first token carries the
space before it (Adapter.label_spans counts a straddling token in the span). The image token is
the config's `image_token_index`, which transformers also exposes as `image_token_id`.
"""
import transformers

from vlmquant.models.base import Adapter
from vlmquant.models.tiny import RENDER_MACRO, TEXT_SIZES, VISION_SIZES, make_tokenizer

# transformers 5 names first; checkpoints saved by transformers 4 or 5 (it writes the old layout)
# keep the decoder under language_model.model. The original LLaVA repo's layout (model.layers,
# model.mm_projector) is not a LlavaForConditionalGeneration checkpoint and is not accepted.
LLAVA_LAYER_PREFIXES = ("model.language_model.layers", "language_model.model.layers")

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


class Llava(Adapter):
    model_class = "LlavaForConditionalGeneration"
    processor_class = "LlavaProcessor"
    checkpoint_layer_prefixes = LLAVA_LAYER_PREFIXES

    def demo(self):
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
            image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
            vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
        return config, processor


ADAPTER = Llava()
