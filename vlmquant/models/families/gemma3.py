"""Gemma 3 (4B-27B): SigLIP features, average-pooled to mm_tokens_per_image tokens and projected into a
Gemma 3 decoder.

Every RMSNorm of the decoder computes x̂·(1 + w) (Gemma3RMSNorm, weights init 0): folding s gives
w' = (1 + w)/s − 1 (quant.fold). Sandwich norms: h = x + post_attention_layernorm(attn(input_layernorm(x))),
out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))); gate/up read
pre_feedforward_layernorm, and the two post-norms feed no linear, so they are no scale source.
Layers are sliding-window or global (config.layer_types) with their own RoPE and attention mask:
a layer run alone gets its own type's (models.capture records every layer's arguments). Image
tokens attend to each other both ways, which the model builds from `token_type_ids` (a per-token
input, io.ragged.TOKEN_KEYS). The chat template writes <bos> and the tokenizer adds one: inputs are
encoded without the second (base.no_second_bos). Checkpoints keep the decoder under
language_model.model.layers (transformers' llava-style saving, as the Hub releases).
"""
import transformers

from vlmquant.models.base import ATTENTION, Adapter, ScaleGroup
from vlmquant.models.families.llava import LLAVA_LAYER_PREFIXES
from vlmquant.models.tiny import RENDER_MACRO, TEXT_SIZES, VISION_SIZES, make_tokenizer

GEMMA_MLP = (
    ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", "mlp", token_wise=True),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", "mlp", token_wise=True),
)
GEMMA_TOKENS = ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                "<image_soft_token>")

# Gemma 3's turns: <bos>, a system message prefixed to the first user turn, role "model" for the assistant,
# an image as <start_of_image> (the processor expands it); the reply and <end_of_turn> are the generation
GEMMA_TEMPLATE = (
    RENDER_MACRO.replace("IMAGE", "<start_of_image>")
    + "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = render(messages[0]['content']) + '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}{{ '\\n' }}{% if loop.first %}{{ prefix }}{% endif %}"
    "{% if role == 'model' %}"
    "{% generation %}{{ render(message['content']) }}<end_of_turn>{% endgeneration %}"
    "{% else %}{{ render(message['content']) }}<end_of_turn>{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model{{ '\\n' }}{% endif %}")


class Gemma3(Adapter):
    model_class = "Gemma3ForConditionalGeneration"
    processor_class = "Gemma3Processor"
    groups = {"attention": ATTENTION, "mlp": GEMMA_MLP}
    checkpoint_layer_prefixes = LLAVA_LAYER_PREFIXES

    def demo(self):
        named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
        tokenizer = make_tokenizer(GEMMA_TOKENS, bos="<bos>", eos="<eos>", pad="<pad>", named=named)
        tokenizer.add_bos_token = True  # as Gemma's tokenizer: encoding prepends <bos>
        ids = tokenizer.convert_tokens_to_ids
        # SigLIP on 112x112 (8x8 patches of 14), pooled to 4x4 = 16 tokens per image; a sliding window of 32
        # (shorter than a sample), so sliding and global layers really differ
        config = transformers.Gemma3Config(
            vision_config=dict(model_type="siglip_vision_model", **VISION_SIZES, image_size=112, patch_size=14),
            text_config=dict(vocab_size=len(tokenizer), **TEXT_SIZES, head_dim=64, query_pre_attn_scalar=64,
                             sliding_window=32, layer_types=["sliding_attention"] * 3 + ["full_attention"],
                             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                              "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id),
            mm_tokens_per_image=16, image_token_index=ids("<image_soft_token>"), boi_token_index=ids("<start_of_image>"),
            eoi_token_index=ids("<end_of_image>"), tie_word_embeddings=True)
        image_processor = transformers.Gemma3ImageProcessorPil(size={"height": 112, "width": 112},
                                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
        processor = transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                                 image_seq_length=16, chat_template=GEMMA_TEMPLATE)
        return config, processor


ADAPTER = Gemma3()
