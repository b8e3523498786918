"""Export a compressed-tensors checkpoint: packed integer (or FP8) decoder weights that vLLM, SGLang and
transformers load (issue 13).

A model whose scales are already folded → for every decoder linear to quantize, the codes, scales and
zero points of vlmquant.quant.codes (the very numbers of the pseudo checkpoint) → compressed-tensors
packs them with its own compressor for the scheme's format (`compress_module`) → `save_pretrained`
writes the shards → `ModelCompressor.update_config` writes `quantization_config` into config.json:

    config.json         quantization_config: quant_method compressed-tensors, format, one config group
                        (targets ["Linear"]) and `ignore`: every linear that is not quantized (vision
                        tower, projector/merger, lm_head, ignored decoder linears) and the MoE routers
    model*.safetensors  quantized linears: weight_packed (int32) + weight_shape [+ weight_zero_point,
                        packed along the output dim] for pack-quantized, int8 / float8_e4m3fn `weight`
                        for int-/float-quantized, weight_scale in the model dtype; the rest as saved
    quantization.json   provenance (run, scale cache sha256, package versions, scheme, module lists)

FP4 schemes (quant/fp4.py): NVFP4 / NVFP4A16 / MXFP4A16 are written by compressed-tensors' own FP4 compressors
(`pack_fp4`): weight_packed uint8 (two E2M1 codes a byte), weight_scale float8_e4m3fn (NVFP4, groups of 16) or uint8
E8M0 (MXFP4, groups of 32), NVFP4's weight_global_scale float32 (1,), shared by the linears vLLM fuses (q/k/v,
gate/up; each expert's gate/up: the pseudo checkpoint's, quant.quantizer.Quantizer.weights), and for W4A4 the static
input_global_scale (1,) calibrated in the search (search.act_scales). vLLM takes the max of the fused linears'
global scales, which are stored equal.

Module names in `ignore`: each skipped linear is written under the name save_pretrained gives its
weight (transformers' revert_weight_conversion: Qwen2-VL `visual.blocks.0.attn.qkv`, `model.layers.3…`)
and, where it differs, under the model's own module name (`model.visual.blocks.0.attn.qkv`). vLLM
rewrites plain names with the model's hf_to_vllm_mapper (both spellings map to its `visual.…` /
`language_model.model.…`; `re:` patterns are not rewritten, which is how `re:model.visual.*` broke
Qwen-VL exports elsewhere); transformers matches `ignore` against its in-memory names without any
mapping, so without the second spelling it quantizes the vision tower on load and fails. Only linears
are listed: the config group targets "Linear", so embeddings and norms are never quantized (and an
embedding named in `ignore` gets a linear method in older vLLM).

Mixture-of-experts layers: every fused expert weight (E, out, in) (adapter.expert_weights) is split into per-expert
linears (adapter.expert_linears: gate_up_proj rows → gate_proj, up_proj) and packed like any linear, under the names
vLLM's Qwen3-MoE-style loaders and the per-expert releases use: `…layers.L.mlp.experts.E.gate_proj.weight_packed`,
`weight_scale`, `weight_shape` [, `weight_zero_point`]. vLLM reads quantized experts only so: it accepts the fused
names (`experts.gate_up_proj`) for the unquantized weight alone, and fused packed tensors load there without error
and serve garbage (llm-compressor 0.12.0, its issue #2939). vLLM picks the MoE method from the scheme of
`<layer>.mlp.experts.0.gate_proj`: the one config group (targets "Linear") covers the experts. The routers
(`mlp.gate`, a bare weight in transformers, a Linear in vLLM) are listed in `ignore` with the other unquantized
linears. transformers 5 reloads per-expert checkpoints only where its conversion mapping fuses them (Qwen3.5-MoE,
not Qwen3-VL-MoE), dequantizing packed or FP8 experts only and without their zero point (asymmetric and int8
experts fail to load there; tests/test_moe_packed.py). vLLM's MoE methods take int4/int8 (and FP8) experts, not W3.

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
from vlmquant.export.checkpoint import (QUANT_FILE, StreamedExport, check_complete, copy_processor_files,
                                       load_and_fold, remove_stale_temps, set_safetensors_metadata, shard_files,
                                       stored_weights)
from vlmquant.export.shards import shard_bytes
from vlmquant.io.atomic import atomic_dir
from vlmquant.io.model_folder import load_whole
from vlmquant.io.provenance import dumps, package_versions
from vlmquant.models.memory import use_streaming
from vlmquant.quant.codes import QuantizedWeight, quantize_weight
from vlmquant.quant.fp4 import ct_fp4_scheme, nvfp4_global_scale, pack_fp4, shared_global_scale
from vlmquant.quant.scheme import FP4_GROUP, FUSED, Scheme, check_scheme, fused_sets
from vlmquant.quant.fake import check_weight_groups
from vlmquant.quant.model import decoder_experts, decoder_linears, layer_experts, layer_root

log = logging.getLogger(__name__)

FORMAT = "compressed-tensors"


def require_compressed_tensors():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise VlmquantError("export format compressed-tensors needs the compressed-tensors package: "
                            "pip install compressed-tensors") from None


def ct_scheme(scheme: Scheme, act_order=False):
    """The compressed-tensors QuantizationScheme (targets ["Linear"]) of a vlmquant Scheme (FP4: its preset,
    NVFP4 / NVFP4A16 / MXFP4A16); act_order: GPTQ's columns were rounded in act-order, stored as `actorder: weight`
    (codes in column order, no g_idx: search.gptq)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if scheme.w_type in FP4_GROUP:
        return ct_fp4_scheme(scheme)

    grouped = scheme.w_group > 0
    weights = QuantizationArgs(num_bits=scheme.w_bit, type=scheme.w_type, symmetric=scheme.symmetric,
                               strategy="group" if grouped else "channel",
                               group_size=scheme.w_group if grouped else None,
                               actorder="weight" if act_order else None)
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


def routers(model, adapter):
    """Full names of the decoder modules that scale groups scale but that are no nn.Linear (MoE routers' `mlp.gate`,
    a bare (E, H) weight in transformers): never quantized, listed in `ignore` for engines that build them as
    linears."""
    scaled = sorted({n for groups in adapter.groups.values() for g in groups for n in g.scaled})
    out = []
    for i, layer in enumerate(adapter.layers(model)):
        modules = dict(layer.named_modules())
        out += [f"{adapter.layers_path}.{i}.{n}" for n in scaled
                if n in modules and not isinstance(modules[n], torch.nn.Linear)]
    return out


def ignore_list(model, quantized, extra=()):
    """compressed-tensors `ignore`: every nn.Linear of the model not in `quantized` (full module names) and the
    modules `extra`, under their saved names and, where different, their in-memory names (see the module doc)."""
    skipped = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in set(quantized)]
    skipped += list(extra)
    saved = saved_names(model, skipped)
    return saved + [n for n in skipped if n not in set(saved)]


@torch.no_grad()
def compress_linear(lin: torch.nn.Linear, scheme: Scheme, ct, q=None) -> None:
    """Replace lin's weight by its compressed-tensors parameters (weight_packed/weight, weight_scale, …), in place:
    the codes `q` (quant.codes.QuantizedWeight: a GPTQ run's stored ones), else those of quantize_weight.

    The compressor re-derives codes as round(weight / scale + zero_point): it is handed our scale and zero
    point and the exact (code - zero) x scale weight in fp32, so it finds our codes (from a bf16 weight
    8-bit codes can be one off).
    """
    from compressed_tensors.compressors import compress_module
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization

    q = quantize_weight(lin.weight, scheme) if q is None else q
    initialize_module_for_quantization(lin, ct, force_zero_point=False)  # weight_scale [, weight_zero_point]
    lin.weight_scale.copy_(q.scale)
    if q.zero_point is not None:
        lin.weight_zero_point.copy_(q.zero_point)
    lin.weight = torch.nn.Parameter(q.dequantize(torch.float32), requires_grad=False)
    compress_module(lin)


@torch.no_grad()
def compress_fp4(lin: torch.nn.Linear, scheme: Scheme, global_scale=None, input_global_scale=None) -> None:
    """Replace lin's weight by its FP4 parameters (quant.fp4.pack_fp4: weight_packed, weight_scale
    [, weight_global_scale, input_global_scale]), in place. global_scale: NVFP4's FP32 (1,), shared by the linears
    it is fused with; input_global_scale: NVFP4 W4A4's static one (1,)."""
    packed = pack_fp4(lin.weight, scheme, global_scale, input_global_scale)
    del lin.weight
    for name, t in packed.items():  # a shared global scale is stored once per linear (save_pretrained refuses aliases)
        t = t.clone() if name.endswith("global_scale") else t
        lin.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))


def compress_linears(named, scheme: Scheme, ct, input_scales=None, stored=None) -> None:
    """compress_linear (or compress_fp4) every linear of [(name, module)], in place; under NVFP4 the linears a
    serving engine fuses (quant.scheme.fused_sets) share one global scale (fp4.shared_global_scale: the pseudo
    checkpoint's). input_scales: {name: static global input scale (a float)} of NVFP4 W4A4 runs; stored: a GPTQ
    run's codes {name: entry} (export.checkpoint.stored_weights), written instead of round to nearest's."""
    if scheme.w_type not in FP4_GROUP:
        for name, lin in named:
            compress_linear(lin, scheme, ct, stored_weights(stored[name])[0] if stored and name in stored else None)
        return
    for idx in fused_sets([n for n, _ in named]):
        members = [named[i] for i in idx]
        gs = shared_global_scale([lin.weight for _, lin in members]) if scheme.w_type == "nvfp4" else None
        for name, lin in members:
            igs = None if input_scales is None else torch.tensor([input_scales[name]], dtype=torch.float32)
            compress_fp4(lin, scheme, gs, igs)


@torch.no_grad()
def pack_experts(layer, experts, adapter, scheme: Scheme, ct, stored=None) -> None:
    """Replace one decoder layer's fused expert weights [(name relative to the layer, (E, out, in) parameter)] by
    per-expert compressed linears `<experts module>.{e}.<adapter.expert_linears[name][k]>`, in place; the fused
    parameters are removed. Codes, scales and zero points are those of quantizer(scheme).weight on the fused weight: it
    quantizes every expert's rows like a linear's, groups along the input; or a GPTQ run's, stored: {name: entry}
    (names relative to the layer; export.checkpoint.stored_weights), split by rows the same way."""
    for name, w in experts:
        parent_name, _, leaf = name.rpartition(".")
        parent, parts = layer.get_submodule(parent_name), adapter.expert_linears[name]
        rows = w.shape[1] // len(parts)
        codes = stored_weights(stored[name]) if stored and name in stored else None
        # NVFP4: each expert's global scale over its fused rows (gate and up share it, as the pseudo weights)
        global_scales = nvfp4_global_scale(w) if scheme.w_type == "nvfp4" else None
        for e in range(w.shape[0]):
            if not hasattr(parent, str(e)):
                parent.add_module(str(e), torch.nn.Module())
            for k, part in enumerate(parts):
                with torch.device("meta"):
                    lin = torch.nn.Linear(w.shape[2], rows, bias=False)
                lin.weight = torch.nn.Parameter(w[e, k * rows:(k + 1) * rows].clone(), requires_grad=False)
                if scheme.w_type in FP4_GROUP:
                    compress_fp4(lin, scheme, None if global_scales is None else global_scales[e:e + 1])
                else:
                    q = None if codes is None else QuantizedWeight(
                        *(None if t is None else t[k * rows:(k + 1) * rows] for t in
                          (codes[e].codes, codes[e].scale, codes[e].zero_point)), codes[e].group)
                    compress_linear(lin, scheme, ct, q)
                getattr(parent, str(e)).add_module(part, lin)
        delattr(parent, leaf)


def check_experts_packable(experts, adapter, scheme: Scheme):
    """Every fused expert weight [(name, (E, out, in) parameter)] splits into its per-expert linears and w_group
    divides their input width. Shapes only (meta device fine)."""
    for name, w in experts:
        parts = adapter.expert_linears.get(name.split(".", 2)[2])  # layers.{i}.<name in the layer>
        if parts is None or w.dim() != 3 or w.shape[1] % len(parts):
            raise VlmquantError(f"{name}: fused expert weight of shape {tuple(w.shape)} has no per-expert linears in "
                                f"the family adapter's expert_linears {dict(adapter.expert_linears)}; add them there")
        try:
            check_weight_groups((w.shape[1] // len(parts), w.shape[2]), scheme.w_group)
        except VlmquantError as e:
            raise VlmquantError(f"{name}: {e}") from None


def layer_stored(stored, index):
    """The GPTQ entries of decoder layer `index`, named relative to the layer."""
    prefix = f"layers.{index}."
    return {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}


def ct_versions():
    versions = package_versions()
    try:
        versions["compressed-tensors"] = metadata.version("compressed-tensors")
    except metadata.PackageNotFoundError:
        versions["compressed-tensors"] = "not installed"
    return versions


def plan_packed(model, adapter, quantize, scheme: Scheme, act_order=False):
    """Every check of write_packed, nothing written: (compressed-tensors scheme, ignore list, decoder-linear names,
    fused expert weight names (packed per expert)). `model` may be on the meta device."""
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
    ct = ct_scheme(scheme, act_order)
    experts = decoder_experts(model, adapter)
    check_experts_packable(experts, adapter, scheme)
    ignore = ignore_list(model, [prefix + n for n in quantize], routers(model, adapter))
    if scheme.experimental:
        log.warning("scheme %s: experimental packed form (vLLM runs 3-bit weights only through one CUDA kernel "
                    "family%s)", scheme.name, ", and its MoE methods take no 3-bit experts" if experts else "")
    return ct, ignore, names, [n for n, _ in experts]


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
        "packed_experts": experts,
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


def write_packed(model, adapter, quantize, scheme: Scheme, out_dir, info=None, source=None, max_shard_size="5GB",
                 stored=None, act_order=False, input_scales=None):
    """Write `model` (scales folded, weights not yet quantized) as a compressed-tensors checkpoint at `out_dir`.

    quantize: names of the decoder linears to quantize, relative to the decoder-layer root (as
    quant.model.decoder_linears gives them); the other decoder linears stay as they are. info: provenance
    merged into quantization.json (run, scale cache sha256, …); source: model folder whose processor and
    tokenizer files are copied. stored: a GPTQ run's codes {name relative to the layer root: entry} (written instead
    of round to nearest's), act_order: they were found in act-order. input_scales: NVFP4 W4A4's {name: static global
    input scale} (export.checkpoint.resolve_export). The model is consumed: its quantized linears hold packed codes
    afterwards.
    Everything that can fail is checked before anything is written; the folder is written under a
    temporary name and renamed when complete. Returns the quantization.json dict.
    Raises VlmquantError for an unknown linear, a w_group not dividing a linear's input width, a split
    q/k/v or gate/up group, or compressed-tensors missing.
    """
    require_compressed_tensors()
    ct, ignore, names, experts = plan_packed(model, adapter, quantize, scheme, act_order)
    prefix = adapter.layers_path.rsplit(".", 1)[0] + "."
    stored = stored or {}
    compress_linears([(n, model.get_submodule(prefix + n)) for n in quantize], scheme, ct, input_scales, stored)
    for i, layer in enumerate(adapter.layers(model)):
        pack_experts(layer, layer_experts(layer, adapter), adapter, scheme, ct, layer_stored(stored, i))
    record = packed_record(model, adapter, names, quantize, experts, scheme, ignore, info)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size=shard_bytes(max_shard_size))
        finish_packed(tmp, ct, ignore, scheme, record, source)
        check_complete(tmp, out_dir, processor=source is not None)
    return record


def load_dequantized(model_class, path, dtype=None, **kwargs):
    """Load a compressed-tensors checkpoint in transformers, every quantized weight dequantized on load.

    The call that loads every scheme with transformers 5.23-5.24 and compressed-tensors 0.20 (the default
    call fails on asymmetric pack-quantized checkpoints): from_pretrained(path,
    quantization_config=CompressedTensorsConfig(dequantize=True)). The model runs dense, without activation
    quantization. Raises VlmquantError when transformers leaves a weight unset (io.model_folder.load_whole).
    """
    require_compressed_tensors()
    from transformers import CompressedTensorsConfig

    return load_whole(model_class, path, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True),
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
                            max_shard_size=max_shard_size, stored=result["stored"], act_order=spec.act_order,
                            input_scales=result.get("input_global_scales"))
    require_compressed_tensors()
    job = StreamedExport(model, spec, cache_path, names)
    skeleton, scheme = job.sm.skeleton, spec.scheme
    ct, ignore, linear_names, experts = plan_packed(skeleton, model.adapter, job.result["quantized"], scheme,
                                                    spec.act_order)
    record = packed_record(skeleton, model.adapter, linear_names, job.result["quantized"], experts, scheme, ignore,
                           job.info)

    def compress(layer, index, linears, experts):
        compress_linears([(f"layers.{index}.{n}", layer.get_submodule(n)) for n in linears], scheme, ct,
                         job.result.get("input_global_scales"), job.result["stored"])
        pack_experts(layer, experts, model.adapter, scheme, ct, layer_stored(job.result["stored"], index))

    remove_stale_temps(out_dir)
    with atomic_dir(out_dir) as tmp:
        job.write(tmp, compress, max_shard_size)
        finish_packed(tmp, ct, ignore, scheme, record, model.path)
        check_complete(tmp, out_dir)
    return record
