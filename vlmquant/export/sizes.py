"""Checkpoint sizes predicted from shapes: dense (model dtype) vs compressed-tensors packed, per scheme.

Bytes of tensor data as compressed-tensors 0.20 stores a quantized linear (out, in), scale and zero
point in `groups` = in / w_group groups per row (1 per channel):
    pack-quantized   weight_packed int32 (out, ceil(in·b/32)) + weight_shape int64 (2,)
                     + weight_scale (out, groups) in the model dtype
                     + asymmetric: weight_zero_point int32 (ceil(out·b/32), groups), packed along out
    int-/float-quantized   weight int8 / float8_e4m3fn (out, in) + weight_scale (out, groups)
    nvfp4-/mxfp4-pack-quantized   weight_packed uint8 (out, in/2) + weight_scale float8_e4m3fn / uint8 E8M0
                     (out, in/16 | in/32) + NVFP4: weight_global_scale float32 (1,) [+ W4A4: input_global_scale (1,)]
A fused MoE expert weight (E, out, in) is stored as E x its per-expert linears (adapter.expert_linears: gate_up_proj
as gate_proj and up_proj, (out/2, in) each), every expert quantized. Everything else (vision tower, projector,
embeddings, lm_head, routers, norms, biases, ignored linears) stays in the model dtype. Safetensors headers (a few
kB per shard) and non-weight files are not counted.
"""
import math

import torch

from vlmquant.quant.scheme import FP4_GROUP, PACK_QUANTIZED, Scheme
from vlmquant.quant.model import decoder_experts, decoder_linears, layer_root


def quantized_linear_bytes(out_features: int, in_features: int, scheme: Scheme, dtype_bytes: int) -> int:
    """Bytes compressed-tensors stores for one quantized (out, in) linear weight (bias not included)."""
    groups = in_features // scheme.w_group if scheme.w_group > 0 else 1
    if scheme.w_type in FP4_GROUP:  # one-byte group scales, FP32 global scales
        global_scales = 0 if scheme.w_type == "mxfp4" else 4 * (1 if scheme.a_bit is None else 2)
        return out_features * in_features // 2 + out_features * groups + global_scales
    scale = out_features * groups * dtype_bytes
    if scheme.format != PACK_QUANTIZED:
        return out_features * in_features + scale
    packed = out_features * math.ceil(in_features * scheme.w_bit / 32) * 4 + 2 * 8
    zero = 0 if scheme.symmetric else math.ceil(out_features * scheme.w_bit / 32) * 4 * groups
    return packed + scale + zero


def packed_size(model, adapter, scheme: Scheme, quantize=None, dtype_bytes=2) -> dict:
    """{"dense": bytes, "packed": bytes, "ratio": dense / packed} of `model` (any device, meta included) with the
    decoder linears `quantize` (relative names; None: all) and every fused expert weight stored under `scheme`,
    the rest in `dtype_bytes`."""
    root = layer_root(model, adapter)
    linears = dict(decoder_linears(model, adapter))
    quantize = set(linears) if quantize is None else set(quantize)
    stored = {}  # parameter id → its bytes under the scheme
    for n in quantize:
        lin = root.get_submodule(n)
        stored[id(lin.weight)] = quantized_linear_bytes(lin.out_features, lin.in_features, scheme, dtype_bytes)
    for name, w in decoder_experts(model, adapter):
        parts = len(adapter.expert_linears[name.split(".", 2)[2]])  # layers.{i}.<name in the layer>
        n_experts, out_features, in_features = w.shape
        stored[id(w)] = n_experts * parts * quantized_linear_bytes(out_features // parts, in_features, scheme,
                                                                   dtype_bytes)
    dense = packed = 0
    for p in {id(p): p for p in model.parameters()}.values():  # tied weights once, as save_pretrained
        dense += p.numel() * dtype_bytes
        packed += stored.get(id(p), p.numel() * dtype_bytes)
    return {"dense": dense, "packed": packed, "ratio": dense / packed}


def packed_size_from_config(config, adapter, scheme: Scheme, quantize=None, dtype_bytes=2) -> dict:
    """packed_size of the family's model built from `config` on the meta device (no weights, no memory)."""
    import transformers

    cls = getattr(transformers, adapter.model_class)
    with torch.device("meta"):
        model = cls._from_config(config)
    return packed_size(model, adapter, scheme, quantize, dtype_bytes)


# the shapes of Qwen/Qwen2-VL-7B-Instruct's config.json (8.29 B parameters), for estimates without the weights
QWEN2_VL_7B = dict(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064),
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, in_channels=3,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    tie_word_embeddings=False)


def qwen2_vl_7b_config():
    """A transformers Qwen2VLConfig with Qwen2-VL-7B's shapes."""
    import transformers

    return transformers.Qwen2VLConfig(**QWEN2_VL_7B)


# the shapes of Qwen/Qwen3-VL-30B-A3B-Instruct's config.json (31.1 B parameters, 29 B of them in the experts)
QWEN3_VL_30B_A3B = dict(
    text_config=dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                     num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936),
    vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048,
                       patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                       num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
    tie_word_embeddings=False)


def qwen3_vl_30b_a3b_config():
    """A transformers Qwen3VLMoeConfig with Qwen3-VL-30B-A3B's shapes."""
    import transformers

    return transformers.Qwen3VLMoeConfig(**QWEN3_VL_30B_A3B)
