"""Export a compressed-tensors checkpoint: packed integer (or FP8) decoder weights that vLLM, SGLang and
transformers load (issue 13).

A model whose scales are already folded → for every decoder linear to quantize, the codes, scales and
zero points of vlmquant.quant.codes (the very numbers of the pseudo checkpoint) → compressed-tensors
packs them with its own compressor for the scheme's format (`compress_module`) → `save_pretrained`
writes the shards → `ModelCompressor.update_config` writes `quantization_config` into config.json:

    config.json         quantization_config: quant_method compressed-tensors, format, one config group
                        (targets ["Linear"]) and `ignore`: every linear that is not quantized (vision
                        tower, projector/merger, lm_head, ignored decoder linears)
    model*.safetensors  quantized linears: weight_packed (int32) + weight_shape [+ weight_zero_point,
                        packed along the output dim] for pack-quantized, int8 / float8_e4m3fn `weight`
                        for int-/float-quantized, weight_scale in the model dtype; the rest as saved
    quantization.json   provenance (run, scale cache sha256, package versions, scheme, module lists)

Module names in `ignore`: each skipped linear is written under the name save_pretrained gives its
weight (transformers' revert_weight_conversion: Qwen2-VL `visual.blocks.0.attn.qkv`, `model.layers.3…`)
and, where it differs, under the model's own module name (`model.visual.blocks.0.attn.qkv`). vLLM
rewrites plain names with the model's hf_to_vllm_mapper (both spellings map to its `visual.…` /
`language_model.model.…`; `re:` patterns are not rewritten, which is how `re:model.visual.*` broke
Qwen-VL exports elsewhere); transformers matches `ignore` against its in-memory names without any
mapping, so without the second spelling it quantizes the vision tower on load and fails. Only linears
are listed: the config group targets "Linear", so embeddings and norms are never quantized (and an
embedding named in `ignore` gets a linear method in older vLLM).

Loading in transformers 5.23-5.24 with compressed-tensors 0.20: asymmetric pack-quantized checkpoints
fail with the default call (the packed zero point does not fit the unpacked parameter transformers
creates); `from_pretrained(path, quantization_config=CompressedTensorsConfig(dequantize=True))`
(= the deprecated `run_compressed=False`) loads every scheme, dequantized; see `load_dequantized`.
"""
import json
import logging
from dataclasses import asdict
from importlib import metadata

import torch

from vlmquant.errors import VlmquantError
from vlmquant.export.checkpoint import (QUANT_FILE, StreamedExport, copy_processor_files, load_and_fold,
                                       remove_stale_temps, set_safetensors_metadata, shard_files)
from vlmquant.export.shards import shard_bytes
from vlmquant.io.atomic import atomic_dir
from vlmquant.io.provenance import dumps, package_versions
from vlmquant.models.memory import use_streaming
from vlmquant.quant.codes import quantize_weight
from vlmquant.quant.scheme import Scheme, check_scheme
from vlmquant.quant.fake import check_weight_groups
from vlmquant.quant.model import decoder_experts, decoder_linears, layer_root

log = logging.getLogger(__name__)

FORMAT = "compressed-tensors"
# linears that serving engines fuse into one layer (vLLM packed_modules_mapping: qkv_proj, gate_up_proj, and
# Qwen3.5's linear attention in_proj_qkvz)
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("in_proj_qkv", "in_proj_z"))
# Fused MoE experts (3-D parameters, quantized in the pseudo checkpoint) are written unquantized: vLLM reads
# quantized experts one tensor per expert (…mlp.experts.{e}.gate_proj.weight_packed, as llm-compressor writes
# them), which transformers cannot load back to check. vLLM asks whether a MoE layer is ignored by probing
# `<layer>.0.gate_proj`, `.0.up_proj`, `.0.down_proj` against `ignore`; this pattern keeps them fp there.
EXPERTS_IGNORE = r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"


def require_compressed_tensors():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise VlmquantError("export format compressed-tensors needs the compressed-tensors package: "
                            "pip install compressed-tensors") from None


def ct_scheme(scheme: Scheme):
    """The compressed-tensors QuantizationScheme (targets ["Linear"]) of a vlmquant Scheme."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    grouped = scheme.w_group > 0
    weights = QuantizationArgs(num_bits=scheme.w_bit, type=scheme.w_type, symmetric=scheme.symmetric,
                               strategy="group" if grouped else "channel",
                               group_size=scheme.w_group if grouped else None)
    acts = None
    if scheme.a_bit is not None:
        acts = QuantizationArgs(num_bits=scheme.a_bit, type=scheme.a_type, symmetric=True, strategy="token",
                                dynamic=True)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts, format=scheme.format)


def check_fused(names, quantized):
    """Raise unless every fused group (q/k/v, gate/up of one layer) among `names` is wholly quantized or wholly not."""
    present, quantized = set(names), set(quantized)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        for group in FUSED:
            if leaf != group[0]:
                continue
            members = [f"{parent}.{m}" for m in group if f"{parent}.{m}" in present]
            kept = [m for m in members if m in quantized]
            if 0 < len(kept) < len(members):
                skipped = [m for m in members if m not in quantized]
                raise VlmquantError(
                    f"export.ignore: {', '.join(skipped)} ignored but {', '.join(kept)} quantized; serving engines "
                    f"fuse {'/'.join(group)} into one layer and cannot load it half quantized: ignore all of them or none")


def saved_names(model, names):
    """The names save_pretrained writes for these modules' weights (transformers' own reverse key mapping)."""
    from transformers.core_model_loading import revert_weight_conversion

    out = []
    for name in names:
        keys = list(revert_weight_conversion(model, {f"{name}.weight": model.get_submodule(name).weight}))
        if len(keys) != 1 or not keys[0].endswith(".weight"):
            raise VlmquantError(f"{name}: transformers saves its weight as {keys}, not one '.weight' key; "
                                "this family needs its own ignore naming")
        out.append(keys[0].removesuffix(".weight"))
    return out


def ignore_list(model, quantized):
    """compressed-tensors `ignore`: every nn.Linear of the model not in `quantized` (full module names), under
    its saved name and, where different, its in-memory name (see the module doc)."""
    skipped = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in set(quantized)]
    saved = saved_names(model, skipped)
    return saved + [n for n in skipped if n not in set(saved)]


@torch.no_grad()
def compress_linear(lin: torch.nn.Linear, scheme: Scheme, ct) -> None:
    """Replace lin's weight by its compressed-tensors parameters (weight_packed/weight, weight_scale, …), in place.

    The compressor re-derives codes as round(weight / scale + zero_point): it is handed our scale and zero
    point and the exact (code - zero) x scale weight in fp32, so it finds our codes (from a bf16 weight
    8-bit codes can be one off).
    """
    from compressed_tensors.compressors import compress_module
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization

    q = quantize_weight(lin.weight, scheme)
    initialize_module_for_quantization(lin, ct, force_zero_point=False)  # weight_scale [, weight_zero_point]
    lin.weight_scale.copy_(q.scale)
    if q.zero_point is not None:
        lin.weight_zero_point.copy_(q.zero_point)
    lin.weight = torch.nn.Parameter(q.dequantize(torch.float32), requires_grad=False)
    compress_module(lin)


def ct_versions():
    versions = package_versions()
    try:
        versions["compressed-tensors"] = metadata.version("compressed-tensors")
    except metadata.PackageNotFoundError:
        versions["compressed-tensors"] = "not installed"
    return versions


def plan_packed(model, adapter, quantize, scheme: Scheme):
    """Every check of write_packed, nothing written: (compressed-tensors scheme, ignore list, decoder-linear names,
    fused expert weight names (kept fp)). `model` may be on the meta device."""
    names = [n for n, _ in decoder_linears(model, adapter)]
    unknown = sorted(set(quantize) - set(names))
    if unknown:
        raise VlmquantError(f"{unknown[0]}: not a language-decoder linear of this model (names are relative to "
                            f"the decoder layers, like {names[0]!r})")
    check_fused(names, quantize)
    root = layer_root(model, adapter)
    for n in quantize:
        try:
            check_weight_groups(tuple(root.get_submodule(n).weight.shape), scheme.w_group)
        except VlmquantError as e:
            raise VlmquantError(f"{n}: {e}") from None
    prefix = adapter.layers_path.rsplit(".", 1)[0] + "."
    ct = ct_scheme(scheme)
    ignore = ignore_list(model, [prefix + n for n in quantize])
    experts = [n for n, _ in decoder_experts(model, adapter)]
    if experts:
        log.warning("%d fused MoE expert weights are written unquantized (folded, in the model dtype): the "
                    "compressed-tensors export does not pack 3-D experts", len(experts))
        ignore.append(EXPERTS_IGNORE)
    if scheme.experimental:
        log.warning("scheme %s: experimental packed form (vLLM runs 3-bit weights only through one CUDA kernel "
                    "family)", scheme.name)
    return ct, ignore, names, experts


def packed_record(model, adapter, names, quantize, experts, scheme, ignore, info=None):
    """quantization.json of a compressed-tensors checkpoint."""
    return {
        **(info or {}),
        "format": FORMAT, "version": 1,
        "scheme": asdict(scheme), "scheme_name": scheme.name, "compressed_tensors_format": scheme.format,
        "experimental": scheme.experimental,
        "w_bit": scheme.w_bit, "w_group": scheme.w_group, "symmetric": scheme.symmetric, "w_type": scheme.w_type,
        "a_bit": scheme.a_bit, "a_type": scheme.a_type if scheme.a_bit else None,
        "dtype": str(model.dtype).removeprefix("torch."),
        "quantized_modules": sorted(quantize), "ignored_decoder_modules": sorted(set(names) - set(quantize)),
        "unquantized_experts": experts,
        "ignore": ignore,
        "modules_relative_to": adapter.layers_path.rsplit(".", 1)[0],
        "packages": ct_versions(),
    }


def finish_packed(folder, ct, ignore, scheme, record, source=None):
    """After the weights and config.json: quantization_config into config.json (ModelCompressor.update_config),
    provenance into every shard and quantization.json, the source's processor files."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    config = QuantizationConfig(config_groups={"group_0": ct}, format=scheme.format, ignore=ignore,
                                quantization_status=QuantizationStatus.COMPRESSED)
    ModelCompressor(quantization_config=config).update_config(folder)
    for shard in shard_files(folder):
        set_safetensors_metadata(folder / shard, {"vlmquant": dumps(record)})
    if source is not None:
        copy_processor_files(source, folder)
    (folder / QUANT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def write_packed(model, adapter, quantize, scheme: Scheme, out_dir, info=None, source=None, max_shard_size="5GB"):
    """Write `model` (scales folded, weights not yet quantized) as a compressed-tensors checkpoint at `out_dir`.

    quantize: names of the decoder linears to quantize, relative to the decoder-layer root (as
    quant.model.decoder_linears gives them); the other decoder linears stay as they are. info: provenance
    merged into quantization.json (run, scale cache sha256, …); source: model folder whose processor and
    tokenizer files are copied. The model is consumed: its quantized linears hold packed codes afterwards.
    Everything that can fail is checked before anything is written; the folder is written under a
    temporary name and renamed when complete. Returns the quantization.json dict.
    Raises VlmquantError for an unknown linear, a w_group not dividing a linear's input width, a split
    q/k/v or gate/up group, or compressed-tensors missing.
    """
    require_compressed_tensors()
    ct, ignore, names, experts = plan_packed(model, adapter, quantize, scheme)
    prefix = adapter.layers_path.rsplit(".", 1)[0] + "."
    for n in quantize:
        compress_linear(model.get_submodule(prefix + n), scheme, ct)
    record = packed_record(model, adapter, names, quantize, experts, scheme, ignore, info)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size=shard_bytes(max_shard_size))
        finish_packed(tmp, ct, ignore, scheme, record, source)
    return record


def load_dequantized(model_class, path, dtype=None, **kwargs):
    """Load a compressed-tensors checkpoint in transformers, every quantized weight dequantized on load.

    The call that loads every scheme with transformers 5.23-5.24 and compressed-tensors 0.20 (the default
    call fails on asymmetric pack-quantized checkpoints): from_pretrained(path,
    quantization_config=CompressedTensorsConfig(dequantize=True)). The model runs dense, without activation
    quantization.
    """
    require_compressed_tensors()
    from transformers import CompressedTensorsConfig

    return model_class.from_pretrained(path, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True),
                                       **kwargs)


def export_packed(model, spec, out_dir, cache_path=None, max_shard_size="5GB", names=None):
    """fp model (ModelRef) + scale cache (none for RTN) → compressed-tensors folder at `out_dir`, with the
    very codes and scales of the run's pseudo checkpoint (export_checkpoint).

    spec: the run's RunSpec; its scheme must have a packed form (quant.codes.check_scheme). Streamed
    (model.stream), decoder layers are loaded, folded, packed and written one at a time; resident, the whole
    model is packed and saved with save_pretrained. Both write the same bytes.
    """
    check_scheme(spec.scheme)
    if not use_streaming(model.stream, model):
        fp, result, info = load_and_fold(model, spec, cache_path, names)
        remove_stale_temps(out_dir)
        return write_packed(fp, model.adapter, result["quantized"], spec.scheme, out_dir, info=info, source=model.path,
                            max_shard_size=max_shard_size)
    require_compressed_tensors()
    job = StreamedExport(model, spec, cache_path, names)
    skeleton, scheme = job.sm.skeleton, spec.scheme
    ct, ignore, linear_names, experts = plan_packed(skeleton, model.adapter, job.result["quantized"], scheme)
    record = packed_record(skeleton, model.adapter, linear_names, job.result["quantized"], experts, scheme, ignore,
                           job.info)

    def compress(layer, index, linears, experts):
        for n in linears:
            compress_linear(layer.get_submodule(n), scheme, ct)

    remove_stale_temps(out_dir)
    with atomic_dir(out_dir) as tmp:
        job.write(tmp, compress, max_shard_size)
        finish_packed(tmp, ct, ignore, scheme, record, model.path)
    return record
