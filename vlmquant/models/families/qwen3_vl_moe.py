"""Qwen3-VL-MoE (30B-A3B, 235B-A22B): Qwen3-VL with mixture-of-experts MLPs.

A MoE layer's MLP is a router `mlp.gate` (a bare (E, H) weight: softmax over all experts, top-k,
renormalised) and fused experts `mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj`
(E, H, I); layers in config.mlp_only_layers keep a dense MLP (base.MOE, base.MLP by layer kind).
The router is scaled with the post-attention norm's group and never quantized (vLLM builds it
unquantized too). Checkpoints: the Qwen releases hold the fused experts transposed, (E, H, 2I) and
(E, I, H), which transformers transposes on load by shape; transformers 5 saves them as the module
holds them. A folder with one tensor per expert is not loadable by transformers for this family.
"""
import transformers

from vlmquant.models.base import ATTENTION, MLP, MOE
from vlmquant.models.families.qwen2_vl import qwen_tokenizer, qwen_vision_ids
from vlmquant.models.families.qwen3_vl import QWEN3_VISION, Qwen3VL, qwen3_processor, qwen3_text_config

# 8 experts, top-2. Expert width 384, a multiple of 128 (group-128 quantization along down_proj's input),
# keeps the fused shapes (E, 768, 256) and (E, 256, 384) non-square, so the transposed layout is told apart by shape.
MOE_SIZES = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=384)


class Qwen3VLMoe(Qwen3VL):
    model_class = "Qwen3VLMoeForConditionalGeneration"
    groups = {"attention": ATTENTION, "mlp": MLP, "moe": MOE}
    expert_layouts = ("fused", "transposed")

    def demo(self):
        tokenizer = qwen_tokenizer()
        # every layer MoE but the last, which keeps a dense MLP (mlp_only_layers)
        config = transformers.Qwen3VLMoeConfig(
            text_config=qwen3_text_config(tokenizer, **MOE_SIZES, decoder_sparse_step=1, mlp_only_layers=[3]),
            vision_config=dict(**QWEN3_VISION, deepstack_visual_indexes=[0, 1]),
            tie_word_embeddings=False, **qwen_vision_ids(tokenizer))
        return config, qwen3_processor(tokenizer)


ADAPTER = Qwen3VLMoe()
