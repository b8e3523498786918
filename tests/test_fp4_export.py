"""FP4 (NVFP4, MXFP4) runs through the export: the packed compressed-tensors folder, decompressed by compressed-tensors
itself, equals the pseudo checkpoint in every weight and logit (dense Qwen2-VL and per-expert Qwen3-VL-MoE), and the
linears vLLM fuses carry one global scale."""
import copy
import json
import re

import pytest
import torch
import transformers
from safetensors.torch import save_file

from vlmquant.export.sizes import packed_size
from vlmquant.models import get_adapter
from vlmquant.models.base import layer_part
from vlmquant.models.tiny import make_demo_model
from vlmquant.quant import fp4
from vlmquant.quant.fold import consumer_weight, fold_scales
from vlmquant.quant.model import decoder_experts, decoder_linears, layer_root, pseudo_quantize

from conftest import run_spec

ct = pytest.importorskip("compressed_tensors", reason="the packed export needs compressed-tensors")

from vlmquant.export.packed import write_packed  # noqa: E402
from test_moe_packed import decompressed, in_pseudo_layout, tensors  # noqa: E402  (shared with the MoE export tests)

RUNS = {"nvfp4a16": {"method": "rtn", "w_bit": 4, "w_type": "nvfp4"},
        "mxfp4a16": {"method": "rtn", "w_bit": 4, "w_type": "mxfp4"}}
INPUT_IDS = torch.tensor([[5, 17, 300, 42, 9, 77, 123, 4, 250, 61]])


def folded_demo(family):
    """The bf16 demo model (compressed-tensors decompresses FP4 to bf16) with random positive scales folded into
    every scale group (fp function unchanged)."""
    model = make_demo_model(family)[0]
    adapter = get_adapter(family)
    g = torch.Generator().manual_seed(1)
    entries = []
    for i, layer in enumerate(adapter.layers(model)):
        for grp in adapter.resolve_groups(layer, i):
            if grp.experts:
                continue
            s = torch.rand(consumer_weight(layer_part(layer, grp.linears[0])).shape[-1], generator=g) * 1.5 + 0.25
            entries.append((f"layers.{i}.{grp.prev}", tuple(f"layers.{i}.{n}" for n in grp.linears), s))
    fold_scales(layer_root(model, adapter), entries)
    return model.to(torch.bfloat16), adapter


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(family, run) → (packed folder, pseudo folder) of the folded bf16 demo, every decoder linear quantized."""
    cache = {}

    def get(family, run):
        if (family, run) not in cache:
            model, adapter = folded_demo(family)
            spec = run_spec(run, **RUNS[run])
            pseudo = copy.deepcopy(model)
            pseudo_quantize(pseudo, adapter, spec)
            pseudo_dir = tmp_path_factory.mktemp(f"pseudo-{family}-{run}")
            pseudo.save_pretrained(pseudo_dir)
            packed_dir = tmp_path_factory.mktemp(f"packed-{family}-{run}") / "checkpoint"
            write_packed(model, adapter, [n for n, _ in decoder_linears(model, adapter)], spec.scheme, packed_dir)
            cache[family, run] = packed_dir, pseudo_dir
        return cache[family, run]

    return get


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl_moe"])
def test_packed_decompresses_to_the_pseudo_checkpoint(exported, family, run, tmp_path):
    """Every tensor of the pseudo folder equals compressed-tensors' decompression of the packed one (experts fused
    back), and both run to the very same logits in transformers."""
    packed, pseudo = exported(family, run)
    adapter = get_adapter(family)
    reference = tensors(pseudo)
    stored = tensors(packed)
    if family == "qwen3_vl_moe":
        assert any(".mlp.experts.7.down_proj.weight_packed" in k for k in stored)
        assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in stored)
    dense = in_pseudo_layout(decompressed(packed, "weight_packed", cast=False), reference, adapter)
    differ = [k for k in reference if not torch.equal(dense[k], reference[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    model, _ = folded_demo(family)
    n_experts = sum(w.shape[0] * len(adapter.expert_linears[n.split(".", 2)[2]])
                    for n, w in decoder_experts(model, adapter))
    assert sum(k.endswith(".weight_packed") for k in stored) == len(decoder_linears(model, adapter)) + n_experts
    folder = tmp_path / "dense"
    folder.mkdir()
    (folder / "config.json").write_text((pseudo / "config.json").read_text())
    save_file(dense, folder / "model.safetensors", metadata={"format": "pt"})
    cls = getattr(transformers, adapter.model_class)
    expect = logits(cls.from_pretrained(pseudo, dtype=torch.bfloat16).eval())
    assert torch.equal(logits(cls.from_pretrained(folder, dtype=torch.bfloat16).eval()), expect)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl_moe"])
def test_fused_linears_share_one_global_scale_in_the_packed_folder(exported, family):
    """q/k/v and gate/up (vLLM's qkv_proj, gate_up_proj; each expert's gate/up) store one weight_global_scale, the
    smallest of their own (fp4.shared_global_scale), and the scale formats are NVFP4's."""
    packed, _ = exported(family, "nvfp4a16")
    stored = tensors(packed)
    config = json.loads((packed / "config.json").read_text())["quantization_config"]
    assert config["format"] == "nvfp4-pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"], weights["group_size"]) == (4, "float", 16)
    model, adapter = folded_demo(family)  # the fp weights the folder was written from
    sets, strictly_shared = 0, 0
    for key in stored:
        for members in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            if not key.endswith(f".{members[0]}.weight_global_scale"):
                continue
            base = key.removesuffix(f"{members[0]}.weight_global_scale")
            scales = [stored[f"{base}{m}.weight_global_scale"] for m in members]
            assert all(torch.equal(s, scales[0]) and s.dtype == torch.float32 and s.shape == (1,) for s in scales)
            sets += 1
            own = [fp4.nvfp4_global_scale(fp_weight(model, adapter, f"{base}{m}")) for m in members]
            assert torch.equal(scales[0], torch.stack(own).amin(0))
            strictly_shared += any(o > scales[0] for o in own)
    assert sets >= (8 if family == "qwen2_vl" else 10) and strictly_shared > 0


def fp_weight(model, adapter, saved):
    """The fp weight of a saved linear `…layers.L.<name>`: a dense linear's, or an expert's rows of a fused expert
    weight (`…layers.L.mlp.experts.E.gate_proj` → mlp.experts.gate_up_proj[E, :I])."""
    index, name = re.search(r"layers\.(\d+)\.(.+)$", saved).groups()
    layer = adapter.layers(model)[int(index)]
    expert = re.fullmatch(r"(.+)\.(\d+)\.(\w+)", name)
    if expert is None or not name.startswith("mlp.experts."):
        return layer.get_submodule(name).weight
    parent, e, part = expert.groups()
    fused, parts = next((n, p) for n, p in adapter.expert_linears.items() if part in p and n.startswith(parent))
    w = layer.get_parameter(fused)[int(e)]
    rows = w.shape[0] // len(parts)
    return w[parts.index(part) * rows:(parts.index(part) + 1) * rows]



@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl_moe"])
def test_predicted_size_is_the_stored_size(exported, family, run):
    """export.sizes predicts the FP4 folder's tensor bytes from shapes alone (one byte per two codes, one per group
    scale, four per global scale)."""
    packed, _ = exported(family, run)
    stored = sum(t.numel() * t.element_size() for t in tensors(packed).values())
    model, adapter = folded_demo(family)
    assert packed_size(model, adapter, run_spec(run, **RUNS[run]).scheme)["packed"] == stored
