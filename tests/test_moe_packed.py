"""compressed-tensors export of mixture-of-experts models (Qwen3-VL-MoE, Qwen3.5-MoE): every fused expert weight is
written per expert (`…mlp.experts.E.gate_proj.weight_packed`, as vLLM reads quantized experts), never fused, and the
per-expert tensors, decompressed by compressed-tensors itself and fused back, equal the pseudo checkpoint's experts
in every weight and every logit, for every scheme with a packed form."""
import copy
import dataclasses
import json
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from vlmquant.errors import VlmquantError
from vlmquant.export.sizes import packed_size, packed_size_from_config, qwen3_vl_30b_a3b_config
from vlmquant.models import get_adapter
from vlmquant.models.tiny import make_demo_model
from vlmquant.quant.quantizer import quantizer
from vlmquant.quant.model import decoder_experts, decoder_linears, quantized_activations
from vlmquant.quant.scheme import Scheme

from conftest import run_spec

ct = pytest.importorskip("compressed_tensors", reason="the packed export needs compressed-tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

from vlmquant.export.packed import export_packed, load_dequantized, write_packed  # noqa: E402

FAMILIES = ("qwen3_vl_moe", "qwen3_5_moe")
SCHEMES = {s.name: s for s in (Scheme(4, 128), Scheme(4, 128, True), Scheme(4, -1, True), Scheme(8, -1),
                               Scheme(8, 128, True), Scheme(3, 128), Scheme(8, -1, True, a_bit=8),
                               Scheme(4, -1, True, a_bit=8), Scheme(8, -1, True, "float", 8, "float"))}
# the only names an expert tensor may be saved under: one module per expert and projection
PER_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.(weight|weight_packed|weight_scale|weight_shape|"
                        r"weight_zero_point)$")
INPUT_IDS = torch.tensor([[5, 17, 300, 42, 9, 77, 123, 4, 250, 61]])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """family → (bf16 demo model, its saved folder)."""
    out = {}
    for family in FAMILIES:
        model = make_demo_model(family)[0].to(torch.bfloat16)
        folder = tmp_path_factory.mktemp(f"source-{family}")
        model.save_pretrained(folder)
        out[family] = model, folder
    return out


@pytest.fixture(scope="module")
def exported(demo, tmp_path_factory):
    """(family, scheme name) → (packed folder, pseudo folder): every decoder linear and every expert quantized."""
    cache = {}

    def get(family, name):
        if (family, name) not in cache:
            model, adapter, scheme = demo[family][0], get_adapter(family), SCHEMES[name]
            pseudo = copy.deepcopy(model)
            with torch.no_grad():
                for _, lin in decoder_linears(pseudo, adapter):
                    lin.weight.copy_(quantizer(scheme).weight(lin.weight))
                for _, w in decoder_experts(pseudo, adapter):
                    w.copy_(quantizer(scheme).weight(w))
            pseudo_dir = tmp_path_factory.mktemp(f"pseudo-{family}-{name}")
            pseudo.save_pretrained(pseudo_dir)
            packed_dir = tmp_path_factory.mktemp(f"packed-{family}-{name}") / "checkpoint"
            names = [n for n, _ in decoder_linears(model, adapter)]
            write_packed(copy.deepcopy(model), adapter, names, scheme, packed_dir)
            cache[family, name] = packed_dir, pseudo_dir
        return cache[family, name]

    return get


def tensors(folder):
    """Every weight tensor of a model folder (its model*.safetensors shards, not scales.safetensors)."""
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def assert_no_fused_experts(folder, n_experts, n_moe_layers):
    """Every expert tensor is saved one per expert and projection (never a fused gate_up_proj or a 3-D tensor), and
    every expert of every MoE layer has its quantized gate/up/down."""
    stored = tensors(folder)
    experts = [k for k in stored if ".experts." in k]
    fused = [k for k in experts if not PER_EXPERT.search(k)]
    assert not fused, f"expert tensors written fused: {fused[:3]}"
    scales = {k.removesuffix(".weight_scale") for k in experts if k.endswith(".weight_scale")}
    assert len(scales) == 3 * n_experts * n_moe_layers


def decompressed(folder, marker="weight_scale", cast=True):
    """{saved name: dense weight} of a compressed-tensors folder: every quantized module (one holding `marker`)
    decompressed by its format's compressor (compressed-tensors' own code), every other tensor and biases as stored.
    cast: the dense weight in the marker tensor's dtype (int formats: the scales carry the model dtype)."""
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    (scheme,) = QuantizationConfig.model_validate(q).config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    stored, out = tensors(folder), {}
    modules = {k.removesuffix(f".{marker}") for k in stored if k.endswith(f".{marker}")}
    for key, t in stored.items():
        module, _, local = key.rpartition(".")
        if module not in modules or local == "bias":
            out[key] = t
        elif local == marker:
            state = {k.rpartition(".")[2]: v for k, v in stored.items() if k.rpartition(".")[0] == module}
            weight = compressor.decompress(state, scheme)["weight"]
            out[f"{module}.weight"] = weight.to(t.dtype) if cast else weight
    return out


def in_pseudo_layout(dense, reference, adapter):
    """The dense tensors under the pseudo folder's names: a fused expert weight there (E, out, in) is built from the
    per-expert weights, its rows in adapter.expert_linears order."""
    out = {}
    for key in reference:
        base, _, leaf = key.rpartition(".")
        parts = adapter.expert_linears.get(f"mlp.experts.{leaf}") if base.endswith(".mlp.experts") else None
        if parts is None:
            out[key] = dense[key]
            continue
        n_experts = reference[key].shape[0]
        out[key] = torch.stack([torch.cat([dense[f"{base}.{e}.{p}.weight"] for p in parts]) for e in range(n_experts)])
    return out


def decompressed_folder(packed, pseudo, adapter, folder):
    """A model folder of the packed checkpoint decompressed by compressed-tensors in the pseudo folder's layout, after
    checking it equals the pseudo folder tensor for tensor."""
    reference = tensors(pseudo)
    dense = in_pseudo_layout(decompressed(packed), reference, adapter)
    differ = [k for k in reference if not torch.equal(dense[k], reference[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    folder.mkdir()
    (folder / "config.json").write_text((pseudo / "config.json").read_text())
    save_file(dense, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def n_moe_layers(family):
    return 3 if family == "qwen3_vl_moe" else 4  # the Qwen3-VL-MoE demo keeps a dense MLP in its last layer


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_decompressed_experts_equal_the_pseudo_checkpoint(exported, demo, family, name, tmp_path):
    """compressed-tensors' decompression of the packed folder, fused back where the pseudo folder holds fused
    experts, equals the pseudo folder tensor for tensor, and run in transformers gives the very same logits."""
    packed, pseudo = exported(family, name)
    adapter = get_adapter(family)
    assert_no_fused_experts(packed, 8, n_moe_layers(family))
    folder = decompressed_folder(packed, pseudo, adapter, tmp_path / "dense")
    cls = getattr(transformers, adapter.model_class)
    expect = logits(cls.from_pretrained(pseudo, dtype=torch.bfloat16).eval())
    assert torch.equal(logits(cls.from_pretrained(folder, dtype=torch.bfloat16).eval()), expect)


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_config_and_ignore_keep_routers_and_quantize_experts(exported, demo, family, name):
    """One config group targets Linear; `ignore` names every router (mlp.gate) and Qwen3.5's shared_expert_gate, the
    vision tower and lm_head, and no expert; quantization.json lists the packed experts."""
    packed, _ = exported(family, name)
    adapter, scheme = get_adapter(family), SCHEMES[name]
    q = json.loads((packed / "config.json").read_text())["quantization_config"]
    (group,) = q["config_groups"].values()
    assert group["targets"] == ["Linear"] and q["format"] == scheme.format
    ignore = set(q["ignore"])
    layers = range(n_moe_layers(family))
    assert {f"model.language_model.layers.{i}.mlp.gate" for i in layers} <= ignore
    if family == "qwen3_5_moe":
        assert {f"model.language_model.layers.{i}.mlp.shared_expert_gate" for i in layers} <= ignore
        assert not any("shared_expert." in n for n in ignore)  # the shared expert is quantized
    assert {"lm_head", "model.visual.blocks.0.attn.qkv", "model.visual.merger.linear_fc1"} <= ignore
    assert not any(".experts" in n or n.startswith("re:") for n in ignore)
    info = json.loads((packed / "quantization.json").read_text())
    assert info["packed_experts"] == [n for n, _ in decoder_experts(demo[family][0], adapter)]
    assert "unquantized_experts" not in info


@pytest.mark.parametrize("name", [n for n, s in SCHEMES.items() if s.a_bit])
@pytest.mark.parametrize("family", FAMILIES)
def test_weight_activation_packed_logits_equal_pseudo_with_run_time_activations(exported, family, name, tmp_path):
    """FP8 W8A8, int8 W8A8 and W4A8: the pseudo checkpoint runs with every decoder linear's and every expert's inputs
    quantized per token at run time (quant.model.quantized_activations); the packed checkpoint decompressed by
    compressed-tensors, and loaded by transformers where it can (transformers_limit), gives the very same logits
    under it, and they are not the logits without activation quantization."""
    packed, pseudo = exported(family, name)
    adapter, scheme = get_adapter(family), SCHEMES[name]
    cls = getattr(transformers, adapter.model_class)
    reference = cls.from_pretrained(pseudo, dtype=torch.bfloat16).eval()
    models = [cls.from_pretrained(decompressed_folder(packed, pseudo, adapter, tmp_path / "dense"),
                                  dtype=torch.bfloat16).eval()]
    if transformers_limit(family, name) is None:
        models.append(load_dequantized(cls, packed, dtype=torch.bfloat16).eval())
    assert len(models) == (2 if family == "qwen3_5_moe" and scheme.format != "int-quantized" else 1)
    with quantized_activations(reference, adapter, scheme) as n:
        expect = logits(reference)
    assert n == len(decoder_linears(reference, adapter)) + n_moe_layers(family)
    assert not torch.equal(expect, logits(reference))
    for model in models:
        with quantized_activations(model, adapter, scheme):
            assert torch.equal(logits(model), expect)


def transformers_limit(family, name):
    """None where transformers 5.25 reloads the packed MoE checkpoint equal to the pseudo one, else (the error the
    load or comparison raises, the upstream limit)."""
    scheme = SCHEMES[name]
    if family == "qwen3_vl_moe":
        return VlmquantError, ("transformers 5.25 has no per-expert → fused conversion for qwen3_vl_moe (only the "
                               "releases' transpose): per-expert experts are not read; the load is refused "
                               "(io.model_folder.load_whole) instead of leaving them at their initial values")
    if not scheme.symmetric:
        return RuntimeError, ("transformers 5.25's CompressedTensorsDequantize hands compressed-tensors each packed "
                              "expert without its zero point: 'Asymmetric quant requires zero-point values'")
    if scheme.format == "int-quantized":
        return RuntimeError, ("transformers 5.25's CompressedTensorsDequantize reads experts as weight_packed or FP8 "
                              "`weight` only: int8 experts leave nothing to fuse ('Concatenate … Ckpt contains: 0')")
    return None


def transformers_cases():
    cases = []
    for family in FAMILIES:
        for name in SCHEMES:
            limit = transformers_limit(family, name)
            marks = () if limit is None else pytest.mark.xfail(strict=True, raises=limit[0], reason=limit[1])
            cases.append(pytest.param(family, name, marks=marks, id=f"{family}-{name}"))
    return cases


@pytest.mark.parametrize("family,name", transformers_cases())
def test_packed_moe_checkpoint_loads_in_transformers_equal_to_pseudo(exported, family, name):
    """The call that loads every compressed-tensors checkpoint (dequantized): weights and logits equal the pseudo
    checkpoint's where transformers can read per-expert packed experts."""
    packed, pseudo = exported(family, name)
    cls = getattr(transformers, get_adapter(family).model_class)
    reference = cls.from_pretrained(pseudo, dtype=torch.bfloat16).eval()
    loaded = load_dequantized(cls, packed, dtype=torch.bfloat16).eval()
    a, b = loaded.state_dict(), reference.state_dict()
    differ = [k for k in b if k not in a or not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert torch.equal(logits(loaded), logits(reference))


def test_a_load_that_leaves_experts_unset_is_refused(exported, demo):
    """Qwen3-VL-MoE's per-expert packed experts, which transformers 5.25 does not read into the fused experts: every
    loader (load_packed, load_dequantized, and the adapter's, which lmms-eval and eval use) refuses the folder with one
    line naming it and the first weight left unset, instead of returning a model whose experts are random."""
    from vlmquant.export.loading import load_packed

    packed, _ = exported("qwen3_vl_moe", Scheme(4, 128, True).name)
    adapter = get_adapter("qwen3_vl_moe")
    cls = getattr(transformers, adapter.model_class)
    for load in (lambda: load_packed(packed), lambda: load_dequantized(cls, packed), lambda: adapter.load_model(packed)):
        with pytest.raises(VlmquantError) as e:
            load()
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"{packed}: transformers ")
        assert "weights of Qwen3VLMoeForConditionalGeneration unset" in message and ".mlp.experts." in message
    missing = int(message.split(" leaves ")[1].split()[0])
    layers = get_adapter("qwen3_vl_moe").demo()[0].text_config.num_hidden_layers
    assert missing == 2 * (layers - 1)  # gate_up_proj and down_proj of each MoE layer (the demo's last is dense)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_export_writes_the_resident_bytes(family_demo, family, tmp_path):
    """export_packed with decoder layers streamed one at a time packs the experts per expert exactly as the
    resident export does (an RTN W4A8 run: a weight-activation scheme on MoE experts)."""
    ref = family_demo(family)[1]
    spec = run_spec("w4a8", method="rtn", w_bit=4, a_bit=8)
    for mode in ("never", "always"):
        export_packed(dataclasses.replace(ref, stream=mode), spec, tmp_path / mode)
    assert_no_fused_experts(tmp_path / "always", 8, n_moe_layers(family))
    never, always = tensors(tmp_path / "never"), tensors(tmp_path / "always")
    assert never.keys() == always.keys() and all(torch.equal(never[k], always[k]) for k in never)
    assert (tmp_path / "never" / "config.json").read_text() == (tmp_path / "always" / "config.json").read_text()


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_predicted_size_is_the_stored_size(exported, demo, family, name):
    """export.sizes counts every expert as its per-expert packed linears: the prediction is the stored bytes."""
    packed, _ = exported(family, name)
    stored = sum(t.numel() * t.element_size() for t in tensors(packed).values())
    predicted = packed_size(demo[family][0], get_adapter(family), SCHEMES[name])
    assert predicted["packed"] == stored
    assert predicted["dense"] == sum(t.numel() * t.element_size() for t in tensors(demo[family][1]).values())


def test_qwen3_vl_30b_a3b_w4_g128_is_3_48_to_3_50_times_smaller():
    """From the released shapes: 31.07 B parameters, 29 B in the experts; what stays bf16 (embeddings, lm_head,
    vision tower: 2.3 GB) holds W4 g128 just under 3.5x."""
    adapter = get_adapter("qwen3_vl_moe")
    asym = packed_size_from_config(qwen3_vl_30b_a3b_config(), adapter, Scheme(4, 128))
    sym = packed_size_from_config(qwen3_vl_30b_a3b_config(), adapter, Scheme(4, 128, True))
    assert 31.06e9 < asym["dense"] / 2 < 31.08e9
    assert 3.47 < asym["ratio"] < 3.48 and 3.49 < sym["ratio"] < 3.50


def test_experts_that_cannot_be_split_or_grouped_are_refused_before_writing(demo, tmp_path):
    """A fused expert weight without per-expert linears in the adapter's data, or a w_group that does not divide an
    expert's input width: one line naming the weight, nothing written."""
    model, adapter = demo["qwen3_5_moe"][0], get_adapter("qwen3_5_moe")
    names = [n for n, _ in decoder_linears(model, adapter)]
    with pytest.raises(VlmquantError, match=r"^layers\.0\.mlp\.experts\.down_proj: .*groups of 256") as e:
        write_packed(copy.deepcopy(model), adapter, names, Scheme(4, 256), tmp_path / "out")  # expert width 128
    assert "\n" not in str(e.value)
    partial = copy.copy(adapter)
    partial.expert_linears = {"mlp.experts.gate_up_proj": ("gate_proj", "up_proj")}
    with pytest.raises(VlmquantError, match=r"^layers\.0\.mlp\.experts\.down_proj: fused expert weight .* add them"):
        write_packed(copy.deepcopy(model), partial, names, Scheme(4, 128), tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_w3_experts_are_packed_marked_experimental(demo, tmp_path, caplog):
    """W3 experts are packed per expert like W4 ones and marked experimental (quantization.json, one warning line):
    vLLM's MoE methods take int4/int8 experts only, so no server runs them; transformers and compressed-tensors
    read them back (the round trips above)."""
    model, adapter, name = demo["qwen3_vl_moe"][0], get_adapter("qwen3_vl_moe"), "w3a16-asym-g128"
    with caplog.at_level("WARNING", logger="vlmquant.export.packed"):
        record = write_packed(copy.deepcopy(model), adapter, [n for n, _ in decoder_linears(model, adapter)],
                              SCHEMES[name], tmp_path / "packed")
    assert record["experimental"] and len(record["packed_experts"]) == 6
    info = json.loads((tmp_path / "packed" / "quantization.json").read_text())
    assert info["experimental"] is True
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "\n" not in warning and warning.startswith(f"scheme {name}: experimental packed form")
    assert "its MoE methods take no 3-bit experts" in warning
