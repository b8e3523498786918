"""Qwen3.5-MoE (35B-A3B, …): Qwen3.5's hybrid decoder with a mixture-of-experts MLP in every layer:
a router, fused experts (as Qwen3-VL-MoE) and a shared expert whose output is gated by
sigmoid(shared_expert_gate(x)).

The post-attention norm feeds the router, every expert's gate/up, the shared expert's gate/up and
shared_expert_gate: one group, loss on the whole MoE block; the router and shared_expert_gate (one
output) are scaled, never quantized. The shared expert's up → down is a group of its own.
Checkpoints: the Hub release holds fused experts; transformers 5.24 saves one tensor per expert
(experts.{e}.gate_proj/up_proj/down_proj.weight) and reads both.
"""
import transformers

from vlmquant.models.base import ATTENTION, ScaleGroup
from vlmquant.models.families.qwen2_vl import qwen_vision_ids
from vlmquant.models.families.qwen3_5 import (LINEAR_ATTENTION, QWEN3_5_KEEP_FP, Qwen3_5, qwen3_5_text_config,
                                              qwen3_5_tokenizer)
from vlmquant.models.families.qwen3_vl import QWEN3_VISION, qwen3_processor

MOE_SHARED = (
    ScaleGroup("post_attention_layernorm", ("mlp.experts.gate_up_proj", "mlp.shared_expert.gate_proj",
                                            "mlp.shared_expert.up_proj"), "mlp", "mlp", token_wise=True,
               scaled=("mlp.gate", "mlp.shared_expert_gate"), inputs="mlp"),
    ScaleGroup("mlp.experts.gate_up_proj", ("mlp.experts.down_proj",), "mlp.experts", "mlp", token_wise=True,
               experts=True, inputs="mlp.experts"),
    ScaleGroup("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",), "mlp.shared_expert.down_proj", "mlp",
               token_wise=True),
)


class Qwen3_5Moe(Qwen3_5):
    model_class = "Qwen3_5MoeForConditionalGeneration"
    groups = {"attention": ATTENTION, "linear_attention": LINEAR_ATTENTION, "moe": MOE_SHARED}
    keep_fp = (*QWEN3_5_KEEP_FP, "mlp.shared_expert_gate")
    expert_layouts = ("fused", "per_expert")

    def demo(self):
        tokenizer = qwen3_5_tokenizer()
        # 8 experts of width 128, top-2, a shared expert of width 256; every MLP is a MoE block
        text = qwen3_5_text_config(tokenizer, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                                   shared_expert_intermediate_size=256)
        text.pop("intermediate_size")
        config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=QWEN3_VISION, tie_word_embeddings=False,
                                               **qwen_vision_ids(tokenizer))
        return config, qwen3_processor(tokenizer)


ADAPTER = Qwen3_5Moe()
