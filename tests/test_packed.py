"""compressed-tensors export on the demo Qwen2-VL with folded scales: loaded back through transformers, the
packed checkpoint equals the pseudo-quantized one of the same run (weights and logits, fp32 and bf16)."""
import copy
import json

import pytest
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from vlmquant.models.tiny import DEMO_PROMPT, make_demo_model
from vlmquant.errors import VlmquantError
from vlmquant.export.sizes import packed_size, packed_size_from_config, qwen2_vl_7b_config
from vlmquant.models import get_adapter
from vlmquant.quant.quantizer import quantizer
from vlmquant.quant.scheme import Scheme
from vlmquant.quant.fp8 import fake_quant_act_fp8
from vlmquant.quant.fold import fold_scales
from vlmquant.quant.model import decoder_linears, layer_root

ct = pytest.importorskip("compressed_tensors", reason="the packed export needs compressed-tensors")
from vlmquant.export.packed import check_fused, load_dequantized, write_packed  # noqa: E402

ADAPTER = get_adapter("qwen2_vl")
MODEL_CLASS = transformers.Qwen2VLForConditionalGeneration
SCHEMES = {s.name: s for s in (Scheme(4, 128), Scheme(4, -1, True), Scheme(8, -1), Scheme(8, 128, True), Scheme(3, 128),
                               Scheme(8, -1, True, a_bit=8), Scheme(4, -1, True, a_bit=8),
                               Scheme(8, -1, True, "float", 8, "float"))}
# decoder linears left in full precision besides the vision tower: a whole q/k/v group and one down_proj
EXTRA_IGNORED = ("layers.1.mlp.down_proj", "layers.2.self_attn.q_proj", "layers.2.self_attn.k_proj",
                 "layers.2.self_attn.v_proj")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def folded_demo(dtype):
    """The demo model with random positive scales folded into every scale group (fp function unchanged)."""
    model, processor = make_demo_model("qwen2_vl")
    g = torch.Generator().manual_seed(1)
    entries = []
    for i, layer in enumerate(ADAPTER.layers(model)):
        for grp in ADAPTER.resolve_groups(layer, i):
            s = torch.rand(layer.get_submodule(grp.linears[0]).in_features, generator=g) * 1.5 + 0.25
            entries.append((f"layers.{i}.{grp.prev}", tuple(f"layers.{i}.{n}" for n in grp.linears), s))
    fold_scales(layer_root(model, ADAPTER), entries)
    return model.to(dtype), processor


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Per dtype: the folded source model, its saved folder, the inputs of one image prompt, the names to quantize."""
    out = {}
    for key, dtype in DTYPES.items():
        model, processor = folded_demo(dtype)
        source = tmp_path_factory.mktemp(f"source-{key}")
        model.save_pretrained(source)
        image = Image.fromarray((torch.rand(84, 112, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy())
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEMO_PROMPT}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = dict(processor(text=[text], images=[image], return_tensors="pt"))
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        names = [n for n, _ in decoder_linears(model, ADAPTER)]
        out[key] = dict(model=model, source=source, inputs=inputs, quantize=[n for n in names if n not in EXTRA_IGNORED])
    return out


@pytest.fixture(scope="module")
def exported(demo, tmp_path_factory):
    """(scheme name, dtype key) -> (packed folder, pseudo folder), each written once."""
    cache = {}

    def get(name, key):
        if (name, key) not in cache:
            d, scheme = demo[key], SCHEMES[name]
            pseudo = copy.deepcopy(d["model"])
            root = layer_root(pseudo, ADAPTER)
            with torch.no_grad():
                for n in d["quantize"]:
                    root.get_submodule(n).weight.copy_(quantizer(scheme).weight(root.get_submodule(n).weight))
            pseudo_dir = tmp_path_factory.mktemp(f"pseudo-{name}-{key}")
            pseudo.save_pretrained(pseudo_dir)
            packed_dir = tmp_path_factory.mktemp(f"packed-{name}-{key}") / "checkpoint"
            write_packed(copy.deepcopy(d["model"]), ADAPTER, d["quantize"], scheme, packed_dir,
                         info={"run": "test-run", "scale_cache_sha256": "0" * 64}, source=None)
            cache[name, key] = packed_dir, pseudo_dir
        return cache[name, key]

    return get


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def assert_same_model(loaded, reference, inputs):
    """Equal logits, then (the first forward of a compressed model decompresses it) equal weights; the loaded
    model may hold its quantization parameters besides."""
    assert torch.equal(logits(loaded, inputs), logits(reference, inputs))
    a, b = loaded.state_dict(), reference.state_dict()
    differ = [k for k in b if k not in a or not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert all(k.endswith(("_scale", "_zero_point", "_shape")) for k in a.keys() - b.keys())


@pytest.mark.parametrize("key", DTYPES)
@pytest.mark.parametrize("name", SCHEMES)
def test_packed_checkpoint_equals_the_pseudo_checkpoint(exported, demo, name, key):
    """Loaded dequantized (the call that works for every scheme), weights and logits on an image prompt are equal."""
    packed, pseudo = exported(name, key)
    dtype = DTYPES[key]
    reference = MODEL_CLASS.from_pretrained(pseudo, dtype=dtype).eval()
    loaded = load_dequantized(MODEL_CLASS, packed, dtype=dtype).eval()
    assert loaded.state_dict().keys() == reference.state_dict().keys()  # a plain dense model
    assert_same_model(loaded, reference, demo[key]["inputs"])


@pytest.mark.parametrize("name", ["w4a16-asym-g128", "w4a16-sym-ch", "w3a16-asym-g128"])
def test_default_load_of_weight_only_checkpoints(exported, demo, name):
    """Symmetric packed checkpoints load with a plain from_pretrained (ignore names match transformers' modules:
    the vision tower stays dense). Asymmetric ones fail there on transformers 5.23-5.24 + compressed-tensors 0.20
    (packed zero point vs the unpacked parameter); where they load, they must be equal too."""
    packed, pseudo = exported(name, "bf16")
    reference = MODEL_CLASS.from_pretrained(pseudo, dtype=torch.bfloat16).eval()
    try:
        loaded = MODEL_CLASS.from_pretrained(packed, dtype=torch.bfloat16).eval()
    except RuntimeError as e:
        assert not SCHEMES[name].symmetric and "mismatched" in str(e)
        return
    assert not hasattr(loaded.get_submodule("model.visual.blocks.0.attn.qkv"), "quantization_scheme")
    assert_same_model(loaded, reference, demo["bf16"]["inputs"])


@pytest.mark.parametrize("name", ["w8a8-sym-ch", "w4a8-sym-ch", "fp8"])
def test_default_load_quantizes_activations_at_run_time(exported, demo, name):
    """The plain load keeps the weights (equal to pseudo) and quantizes activations per token on the fly.
    FP8 in fp32: compressed-tensors' dynamic scale (absmax / 448) is ours, so the logits equal the pseudo model
    with fake FP8 inputs at every quantized linear. Int8 differs (it divides by 127.5, vLLM and we by 127)."""
    packed, pseudo = exported(name, "fp32")
    reference = MODEL_CLASS.from_pretrained(pseudo, dtype=torch.float32).eval()
    loaded = MODEL_CLASS.from_pretrained(packed, dtype=torch.float32).eval()
    inputs = demo["fp32"]["inputs"]
    out = logits(loaded, inputs)  # the first forward decompresses the weights
    a, b = loaded.state_dict(), reference.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    if name != "fp8":
        assert not torch.equal(out, logits(reference, inputs))
        return
    root = layer_root(reference, ADAPTER)
    hooks = [root.get_submodule(n).register_forward_pre_hook(lambda m, args: (fake_quant_act_fp8(args[0]),))
             for n in demo["fp32"]["quantize"]]
    assert torch.equal(out, logits(reference, inputs))
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("name", SCHEMES)
def test_config_json_and_ignore_names(exported, demo, name):
    scheme = SCHEMES[name]
    packed, _ = exported(name, "bf16")
    q = json.loads((packed / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == scheme.format
    assert q["quantization_status"] == "compressed"
    (group,) = q["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["format"] == scheme.format
    w = group["weights"]
    assert (w["num_bits"], w["type"], w["symmetric"]) == (scheme.w_bit, scheme.w_type, scheme.symmetric)
    assert (w["strategy"], w["group_size"]) == (("group", 128) if scheme.w_group > 0 else ("channel", None))
    acts = group["input_activations"]
    if scheme.a_bit is None:
        assert acts is None
    else:
        assert (acts["num_bits"], acts["type"], acts["strategy"], acts["dynamic"], acts["symmetric"]) == (
            8, scheme.a_type, "token", True, True)
    # every linear that is not quantized, as saved (visual.*, model.layers.*) and as transformers names it
    vision = [f"visual.blocks.{b}.{m}" for b in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    vision += ["visual.merger.mlp.0", "visual.merger.mlp.2"]
    extra = [f"model.layers.{n.removeprefix('layers.')}" for n in EXTRA_IGNORED]
    saved = vision + ["lm_head"] + extra
    in_memory = ["model." + n for n in vision] + ["model.language_model." + n for n in EXTRA_IGNORED]
    assert sorted(q["ignore"]) == sorted(saved + in_memory)
    assert not any(n.startswith("re:") for n in q["ignore"])


# vLLM's Qwen2-VL hf_to_vllm_mapper (orig_to_new_prefix): CompressedTensorsConfig.apply_vllm_mapper rewrites
# every plain `ignore` entry with it (`re:` entries are left as they are); vLLM then matches exact names.
VLLM_QWEN2_VL_PREFIXES = {"model.language_model.": "language_model.model.", "model.visual.": "visual.",
                          "lm_head.": "language_model.lm_head.", "model.": "language_model.model."}


def vllm_name(name):
    for old in sorted(VLLM_QWEN2_VL_PREFIXES, key=len, reverse=True):
        if name.startswith(old):
            return VLLM_QWEN2_VL_PREFIXES[old] + name[len(old):]
    return name


def test_ignore_list_covers_vllm_module_names(exported, demo):
    packed, _ = exported("w4a16-asym-g128", "bf16")
    ignore = {vllm_name(n) for n in json.loads((packed / "config.json").read_text())["quantization_config"]["ignore"]}
    vision = {f"visual.blocks.{b}.{m}" for b in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert vision | {"visual.merger.mlp.0", "visual.merger.mlp.2"} <= ignore
    assert {f"language_model.model.{n}" for n in EXTRA_IGNORED} <= ignore
    assert not {f"language_model.model.{n}" for n in demo["bf16"]["quantize"]} & ignore


def tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name", SCHEMES)
def test_stored_tensors_shapes_and_ignored_modules_bit_identical(exported, demo, name):
    scheme = SCHEMES[name]
    packed, _ = exported(name, "bf16")
    stored, source = tensors(packed), tensors(demo["bf16"]["source"])
    quantized = {f"model.layers.{n.removeprefix('layers.')}" for n in demo["bf16"]["quantize"]}
    for key, t in source.items():  # vision tower, merger, embeddings, norms, lm_head, ignored linears, biases
        if key.rsplit(".", 1)[0] not in quantized or key.endswith(".bias"):
            assert torch.equal(stored[key], t), key
    for module in quantized:
        out_f, in_f = source[module + ".weight"].shape
        groups = in_f // 128 if scheme.w_group > 0 else 1
        scale = stored[module + ".weight_scale"]
        assert scale.shape == (out_f, groups) and scale.dtype == torch.bfloat16
        assert module + ".weight" not in stored or scheme.format != "pack-quantized"
        if scheme.format == "pack-quantized":
            assert stored[module + ".weight_packed"].shape == (out_f, in_f * scheme.w_bit // 32)
            assert stored[module + ".weight_packed"].dtype == torch.int32
            assert stored[module + ".weight_shape"].tolist() == [out_f, in_f]
        else:
            dtype = torch.float8_e4m3fn if scheme.w_type == "float" else torch.int8
            assert stored[module + ".weight"].shape == (out_f, in_f) and stored[module + ".weight"].dtype == dtype
        zp = stored.get(module + ".weight_zero_point")
        if scheme.symmetric:
            assert zp is None
        else:  # packed along the output dim
            assert zp.shape == (out_f * scheme.w_bit // 32, groups) and zp.dtype == torch.int32
    extra = {k for k in stored if k not in source}
    assert all(k.rsplit(".", 1)[0] in quantized for k in extra)


def test_provenance_in_quantization_json_and_shards(exported):
    packed, _ = exported("w4a16-asym-g128", "bf16")
    info = json.loads((packed / "quantization.json").read_text())
    assert info["run"] == "test-run" and info["scale_cache_sha256"] == "0" * 64
    assert info["format"] == "compressed-tensors" and info["scheme_name"] == "w4a16-asym-g128" and not info["experimental"]
    assert info["packages"]["compressed-tensors"] == ct.__version__
    assert info["ignored_decoder_modules"] == sorted(EXTRA_IGNORED)
    with safe_open(packed / "model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["vlmquant"]) == info
    assert not list(packed.parent.glob(".*.tmp"))


@pytest.mark.parametrize("split", [["layers.0.self_attn.k_proj"], ["layers.3.mlp.gate_proj"],
                                   ["layers.2.self_attn.q_proj", "layers.2.self_attn.v_proj"]])
def test_split_fused_groups_are_refused_before_writing(demo, tmp_path, split):
    names = [n for n, _ in decoder_linears(demo["bf16"]["model"], ADAPTER)]
    model = copy.deepcopy(demo["bf16"]["model"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VlmquantError, match="fuse .* cannot load it half quantized") as e:
        write_packed(model, ADAPTER, [n for n in names if n not in split], Scheme(4, 128), tmp_path / "out")
    assert split[0] in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    check_fused(names, [n for n in names if "self_attn" not in n])  # whole groups ignored: fine


def test_unknown_names_and_bad_groups_are_refused(demo, tmp_path):
    model = demo["bf16"]["model"]
    names = [n for n, _ in decoder_linears(model, ADAPTER)]
    with pytest.raises(VlmquantError, match="layers.9.mlp.down_proj: not a language-decoder linear"):
        write_packed(model, ADAPTER, names + ["layers.9.mlp.down_proj"], Scheme(4, 128), tmp_path / "out")
    with pytest.raises(VlmquantError, match="layers.0.self_attn.q_proj: .*groups of 512"):  # 256 inputs
        write_packed(model, ADAPTER, names, Scheme(4, 512), tmp_path / "out")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", SCHEMES)
def test_predicted_size_is_the_stored_size(exported, demo, name):
    packed, _ = exported(name, "bf16")
    stored = sum(t.numel() * t.element_size() for t in tensors(packed).values())
    predicted = packed_size(demo["bf16"]["model"], ADAPTER, SCHEMES[name], demo["bf16"]["quantize"])
    dense = sum(t.numel() * t.element_size() for t in tensors(demo["bf16"]["source"]).values())
    assert predicted["packed"] == stored and predicted["dense"] == dense


def test_qwen2_vl_7b_w4_is_about_2_4_times_smaller():
    sizes = packed_size_from_config(qwen2_vl_7b_config(), ADAPTER, Scheme(4, 128))
    assert 8.28e9 < sizes["dense"] / 2 < 8.30e9  # Qwen2-VL-7B has 8.29 B parameters
    assert 2.35 < sizes["ratio"] < 2.45


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "llava_onevision", "internvl"])
def test_other_families_round_trip(family, tmp_path):
    """Each family's naming (saved vs in-memory) comes from transformers: the default load keeps its vision
    tower dense and the checkpoint equals the pseudo one."""
    adapter = get_adapter(family)
    model_class = getattr(transformers, adapter.model_class)
    model, _ = make_demo_model(family)
    model = model.to(torch.bfloat16)
    names = [n for n, _ in decoder_linears(model, adapter)]
    scheme = Scheme(4, 128, True)
    pseudo = copy.deepcopy(model)
    root = layer_root(pseudo, adapter)
    with torch.no_grad():
        for n in names:
            root.get_submodule(n).weight.copy_(quantizer(scheme).weight(root.get_submodule(n).weight))
    pseudo.save_pretrained(tmp_path / "pseudo")
    write_packed(model, adapter, names, scheme, tmp_path / "packed")
    reference = model_class.from_pretrained(tmp_path / "pseudo", dtype=torch.bfloat16).eval()
    loaded = model_class.from_pretrained(tmp_path / "packed", dtype=torch.bfloat16).eval()
    assert_same_model(loaded, reference, {"input_ids": torch.tensor([[5, 17, 300, 42, 9]])})
