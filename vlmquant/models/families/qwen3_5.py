"""Qwen3.5 (natively multimodal): a Qwen3-VL-style vision tower feeding a hybrid decoder whose layers
are gated delta-net linear attention (`linear_attn`) or gated full attention (`self_attn`), as
config.layer_types says (default: every fourth layer full). No deepstack.

Every RMSNorm of the decoder computes x̂·(1 + w) (Qwen3_5RMSNorm, weights init 0), so folding s
gives w' = (1 + w)/s − 1 (quant.fold); the gated norm inside linear attention is x̂·w · silu(z), its
weight (head_v_dim,) shared by every value head, so the scales of its group repeat per head.
Linear-attention layers: input_layernorm feeds in_proj_qkv, in_proj_z, in_proj_b and in_proj_a (one
group, loss on the whole linear_attn: a causal conv and a recurrence, so not token-wise);
in_proj_b/in_proj_a (one output per value head: the decay and the write gate) are scaled, never
quantized, as NVIDIA ModelOpt leaves them; vLLM fuses them into in_proj_ba, which stays unquantized.
Full-attention layers: q_proj outputs query and gate per head; v_proj → o_proj stays exact through
the sigmoid gate.
"""
import transformers

from vlmquant.models.base import ATTENTION, MLP, ScaleGroup
from vlmquant.models.families.qwen2_vl import QWEN_TOKENS, qwen_vision_ids
from vlmquant.models.families.qwen3_vl import QWEN3_VISION, Qwen3VL, qwen3_processor
from vlmquant.models.tiny import TEXT_SIZES, train_bpe

LINEAR_ATTENTION = (
    ScaleGroup("input_layernorm", ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z"), "linear_attn", "attn",
               scaled=("linear_attn.in_proj_b", "linear_attn.in_proj_a")),
    # s shared by the value heads (the norm's weight is): searched on channel statistics pooled over heads
    ScaleGroup("linear_attn.norm", ("linear_attn.out_proj",), "linear_attn.out_proj", "attn", token_wise=True),
)
QWEN3_5_KEEP_FP = ("linear_attn.in_proj_b", "linear_attn.in_proj_a")

# gated delta-net: 2 key heads and 4 value heads of 64 (value width 256, a multiple of 128); the full-attention
# layer rotates a quarter of head_dim (16 dims: 8 frequencies in sections t/h/w of 3/3/2)
QWEN3_5_TEXT = dict(linear_conv_kernel_dim=4, linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=2,
                    linear_num_value_heads=4, layer_types=["linear_attention"] * 3 + ["full_attention"])


def qwen3_5_tokenizer():
    """Qwen3_5Tokenizer (the class real Qwen3.5 folders name) over the demo BPE, with Qwen's special tokens."""
    vocab, merges = train_bpe()
    vocab = dict(vocab)
    for token in QWEN_TOKENS:
        vocab[token] = len(vocab)
    return transformers.Qwen3_5Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in QWEN_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=TEXT_SIZES["max_position_embeddings"])


def qwen3_5_text_config(tokenizer, **extra):
    return dict(vocab_size=len(tokenizer), **TEXT_SIZES, head_dim=64, **QWEN3_5_TEXT, bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [3, 3, 2], "mrope_interleaved": True,
                                 "rope_theta": 1e7, "partial_rotary_factor": 0.25}, **extra)


class Qwen3_5(Qwen3VL):
    model_class = "Qwen3_5ForConditionalGeneration"
    groups = {"attention": ATTENTION, "linear_attention": LINEAR_ATTENTION, "mlp": MLP}
    keep_fp = QWEN3_5_KEEP_FP

    def demo(self):
        tokenizer = qwen3_5_tokenizer()
        config = transformers.Qwen3_5Config(text_config=qwen3_5_text_config(tokenizer), vision_config=QWEN3_VISION,
                                            tie_word_embeddings=False, **qwen_vision_ids(tokenizer))
        return config, qwen3_processor(tokenizer)


ADAPTER = Qwen3_5()
