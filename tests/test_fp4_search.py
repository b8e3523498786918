"""FP4 runs through the search stage on the demo Qwen2-VL (library calls, no Snakemake): RunSpec and config errors,
the quantizer's fused global scale, the search never losing to RTN under NVFP4/MXFP4, NVFP4 W4A4's static input
scales calibrated in the search, and its checkpoints: the packed folder equals the pseudo one in every weight and
in the logits with activations quantized."""
import json

import pytest
import torch

from vlmquant.data.calib import build_calib
from vlmquant.data.inputs import build_inputs
from vlmquant.errors import VlmquantError
from vlmquant.export.checkpoint import export_checkpoint, runtime_activations
from vlmquant.io import ragged
from vlmquant.io.scales import chunk_layer_files, load_cache, load_layer, merge
from vlmquant.export.sizes import packed_size
from vlmquant.models import get_adapter
from vlmquant.models.capture import load_samples, model_inputs, token_masks
from vlmquant.models.loading import open_model
from vlmquant.quant import fp4
from vlmquant.quant.model import apply_scale_cache, decoder_linears, quantized_activations
from vlmquant.quant.quantizer import quantizer
from vlmquant.quant.scheme import Scheme, fused_sets
from vlmquant.search import pipeline as P

from conftest import run_spec
from test_calib import coco_cfg

ADAPTER = get_adapter("qwen2_vl")
RUNS = {"mbq-nvfp4": {"method": "mbq", "w_bit": 4, "w_type": "nvfp4", "a_bit": 4},
        "awq-nvfp4a16": {"method": "awq", "w_bit": 4, "w_type": "nvfp4"},
        "mbq-mxfp4": {"method": "mbq", "w_bit": 4, "w_type": "mxfp4"},
        "sq-nvfp4": {"method": "smoothquant", "w_bit": 4, "w_type": "nvfp4", "a_bit": 4, "alpha": 0.5}}


# --- config --------------------------------------------------------------------------------------
def test_fp4_runs_fill_the_format_group_and_name_the_preset():
    assert run_spec("a", method="rtn", w_bit=4, w_type="nvfp4").scheme == Scheme(4, 16, True, "nvfp4")
    assert run_spec("a", method="rtn", w_bit=4, w_type="mxfp4", w_group=32).scheme == Scheme(4, 32, True, "mxfp4")
    spec = run_spec("a", **RUNS["mbq-nvfp4"])
    assert spec.scheme == Scheme(4, 16, True, "nvfp4", 4, "float") and spec.scheme.name == "nvfp4"
    assert spec.formats == ("compressed-tensors",)
    assert run_spec("a", **spec.search_params()) == spec  # params round trip


@pytest.mark.parametrize("cfg,key", [
    ({"w_type": "nvfp4", "w_group": 32}, "w_group"), ({"w_type": "mxfp4", "w_group": 16}, "w_group"),
    ({"w_type": "nvfp4", "w_bit": 8}, "w_bit"), ({"w_type": "nvfp4", "w_sym": False}, "w_sym"),
    ({"w_type": "mxfp4", "a_bit": 4}, "a_bit"), ({"w_type": "nvfp4", "a_bit": 8}, "a_bit"),
    ({"w_type": "nvfp4", "a_bit": 4, "method": "rtn"}, "method"),
    ({"w_type": "nvfp4", "a_bit": 4, "distort": True}, "distort"),
    ({"w_type": "nvfp4", "a_bit": 4, "scale_cache": "x.pt"}, "scale_cache")])
def test_invalid_fp4_runs_are_one_line_errors(cfg, key):
    with pytest.raises(VlmquantError, match=rf"^config: runs\.bad\.{key}: [^\n]+$"):
        run_spec("bad", **{"method": "mbq", "w_bit": 4, **cfg})


def test_the_default_config_checks_fp4_runs_against_the_schema(cfg):
    from conftest import check

    cfg["runs"]["bad"] = {"method": "mbq", "w_bit": 4, "w_type": "fp4"}
    with pytest.raises(Exception, match="fp4"):
        check(cfg)
    del cfg["runs"]["bad"]
    runs = check(cfg)["runs"]
    assert runs["mbq-nvfp4"] == {"method": "mbq", "w_bit": 4, "w_type": "nvfp4", "a_bit": 4, "loss": "mae",
                                 "n_grid": 20, "reweight": True}
    assert runs["awq-mxfp4"]["w_group"] == 32
    cfg["runs"]["mbq-nvfp4"]["w_group"] = 32
    with pytest.raises(VlmquantError, match=r"runs\.mbq-nvfp4\.w_group: nvfp4 quantizes weights in groups of 16"):
        check(cfg)


# --- quantizer -----------------------------------------------------------------------------------
def test_fused_weights_share_the_smallest_global_scale_and_others_quantize_alone():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(32, 64, generator=g) * k for k in (1.0, 3.0, 0.5)]
    q = quantizer(Scheme(4, 16, True, "nvfp4"))
    gs = 448 * 6 / max(float(w.abs().max()) for w in ws)  # the largest amax of the three
    for w, got in zip(ws, q.weights(ws)):
        assert torch.equal(got, fp4.fake_quant_weight_nvfp4(w, torch.tensor([gs], dtype=torch.float32)))
    assert not torch.equal(q.weights(ws)[0], q.weight(ws[0]))  # the sharing changes the weight
    s = torch.rand(64, generator=g) + 0.5
    want = [w_q / s for w_q in q.weights([w * s for w in ws])]
    assert all(torch.equal(a, b) for a, b in zip(q.scaled_weights(ws, s), want))
    mx = quantizer(Scheme(4, 32, True, "mxfp4"))
    assert all(torch.equal(a, mx.weight(w)) for a, w in zip(mx.weights(ws), ws))
    assert fused_sets(["l.q_proj", "l.k_proj", "l.o_proj", "l.v_proj", "m.k_proj", "l.up_proj", "l.gate_proj"]) == \
        [[0, 1, 3], [2], [4], [5, 6]]


def test_nvfp4_activations_need_the_static_scale_and_use_it():
    q = quantizer(Scheme(4, 16, True, "nvfp4", 4, "float"))
    x = torch.randn(3, 5, 32)
    with pytest.raises(VlmquantError, match="static global input scale"):
        q.act(x)
    s = torch.rand(32) + 0.5
    gs = fp4.input_global_scale(x.abs().amax((0, 1)), s)
    assert torch.equal(gs, fp4.calibrate_input_global_scale([x / s]))
    assert torch.equal(q.act(x, s, gs), fp4.fake_quant_act_nvfp4(x / s, gs) * s)
    with pytest.raises(VlmquantError, match="NVFP4 only"):
        quantizer(Scheme(4, 32, True, "mxfp4", 4, "float"))


# --- the search on the demo ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def staged(demo_data, demo_model_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("fp4search")
    model = open_model({"family": "qwen2_vl", "path": str(demo_model_path), "dtype": "float32"}, "cpu")
    build_calib(coco_cfg(demo_data, n_samples=4), d / "calib.parquet")
    build_inputs(d / "calib.parquet", model, d / "inputs.safetensors")
    P.run_grads(model, d / "inputs.safetensors", d / "grads.safetensors")
    P.run_acts(model, d / "inputs.safetensors", [0], d / "acts")
    return d, model


@pytest.fixture(scope="module")
def searched(staged):
    """run name → its merged scale cache (all 4 layers in one job)."""
    d, model = staged
    out = {}

    def get(run):
        if run not in out:
            spec = run_spec(run, **RUNS[run])
            names = {"model": "demo", "calib": "demo", "run": run}
            folder = d / run / "chunk_000"
            P.run_search(model, spec, d / "inputs.safetensors", d / "acts",
                         d / "grads.safetensors" if spec.needs_grads else None, [0, 1, 2, 3], folder, names)
            merge(chunk_layer_files([folder]), d / run / "cache.pt", d / run / "search.parquet",
                  {**names, "run_config": spec.search_params()})
            out[run] = d / run / "cache.pt"
        return out[run]
    return get


@pytest.mark.parametrize("run", ["mbq-nvfp4", "awq-nvfp4a16", "mbq-mxfp4"])
def test_search_never_loses_to_rtn_under_fp4(searched, run):
    """Every group keeps the candidate of smallest loss, α = 0 (RTN under the FP4 quantizer) among them."""
    moved = 0
    for path in chunk_layer_files([searched(run).parent / "chunk_000"]):
        t, info = load_layer(path)
        assert len(info["groups"]) == 4
        for losses, best in zip(t["losses"], t["best"]):
            assert losses[best] == losses.min() and losses[best] <= losses[0]
            moved += int(best) > 0
    assert moved > 0  # the search moved off RTN somewhere


def fp_inputs_max(model_ref, inputs_path):
    """max |x| per channel over the valid tokens of every decoder linear's fp input, by an independent hooked forward
    of the whole fp model."""
    model = model_ref.load()
    samples, _ = load_samples(inputs_path)
    batch = ragged.collate(samples)
    valid = token_masks(batch)["valid"]
    maxima, handles = {}, []
    for name, lin in decoder_linears(model, ADAPTER):
        def hook(module, args, name=name):
            maxima[name] = args[0][valid].abs().amax(0)
        handles.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(**model_inputs(batch, "cpu", torch.float32))
    for h in handles:
        h.remove()
    return maxima


def test_nvfp4_w4a4_input_amax_is_the_scaled_calibration_input_max(staged, searched):
    d, model = staged
    cache = load_cache(searched("mbq-nvfp4"))
    amax = cache["meta"]["input_amax"]
    maxima = fp_inputs_max(model, d / "inputs.safetensors")
    assert sorted(amax) == sorted(maxima) and len(amax) == 4 * 7
    scales = {n: s for _, linears, s in cache["scale"] for n in linears}
    for name, m in maxima.items():
        want = float((m / scales[name]).amax()) if name in scales else float(m.amax())
        assert amax[name] == pytest.approx(want, rel=1e-5), name  # the search saw the same inputs, in layer chunks
    for idx in fused_sets(list(amax)):  # q/k/v and gate/up take one input: one amax, one global scale
        assert len({amax[list(amax)[i]] for i in idx}) == 1


@pytest.fixture(scope="module")
def w4a4_export(staged, searched, demo_model_path, tmp_path_factory):
    """The MBQ NVFP4 W4A4 run exported in bf16 (compressed-tensors decompresses FP4 to bf16): (pseudo, packed)."""
    from vlmquant.export.packed import export_packed

    out = tmp_path_factory.mktemp("w4a4")
    spec = run_spec("mbq-nvfp4", **RUNS["mbq-nvfp4"])
    model = open_model({"family": "qwen2_vl", "path": str(demo_model_path), "dtype": "bfloat16"}, "cpu")
    names = {"model": "demo", "calib": "demo", "run": "mbq-nvfp4"}
    export_checkpoint(model, spec, out / "checkpoint", searched("mbq-nvfp4"), names=names)
    export_packed(model, spec, out / "packed", searched("mbq-nvfp4"), names=names)
    return out / "checkpoint", out / "packed"


def test_nvfp4_w4a4_packed_equals_pseudo_in_weights_scales_and_logits(staged, w4a4_export):
    pytest.importorskip("compressed_tensors")
    from test_moe_packed import decompressed, tensors

    pseudo, packed = w4a4_export
    scheme, ignored, input_scales = runtime_activations(pseudo)
    assert scheme == Scheme(4, 16, True, "nvfp4", 4, "float") and len(input_scales) == 4 * 7
    config = json.loads((packed / "config.json").read_text())["quantization_config"]
    assert config["format"] == "nvfp4-pack-quantized"
    acts = config["config_groups"]["group_0"]["input_activations"]
    assert (acts["num_bits"], acts["type"], acts["group_size"], acts["dynamic"]) == (4, "float", 16, "local")
    stored, reference = tensors(packed), tensors(pseudo)
    dense = decompressed(packed, "weight_packed", cast=False)
    differ = [k for k in reference if not torch.equal(dense[k], reference[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    prefix = "model.layers."
    for name, gs in input_scales.items():
        assert stored[prefix + name.removeprefix("layers.") + ".input_global_scale"].item() == gs
    # the logits: the pseudo checkpoint with its activations quantized at run time, and the packed weights with the
    # packed folder's input_global_scale, as a W4A4 engine runs them
    d, _ = staged
    samples, _ = load_samples(d / "inputs.safetensors")
    batch = model_inputs(ragged.collate(samples[:2]), "cpu", torch.bfloat16)
    ref_model = ADAPTER.load_model(pseudo, torch.bfloat16)
    packed_model = ADAPTER.load_model(packed, torch.bfloat16)  # transformers, dequantized on load
    state, ref_state = packed_model.state_dict(), ref_model.state_dict()
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
    packed_scales = {f"layers.{k.removeprefix(prefix)}".removesuffix(".input_global_scale"): v.item()
                     for k, v in stored.items() if k.endswith(".input_global_scale")}
    with torch.no_grad():
        with quantized_activations(ref_model, ADAPTER, scheme, ignored, input_scales):
            want = ref_model(**batch).logits
        with quantized_activations(packed_model, ADAPTER, scheme, ignored, packed_scales):
            got = packed_model(**batch).logits
    assert torch.equal(got, want)
    with torch.no_grad():
        plain = ref_model(**batch).logits
    assert not torch.equal(plain, want)  # the activation quantization is on
    stored_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    assert packed_size(ref_model, ADAPTER, scheme)["packed"] == stored_bytes  # input_global_scale counted too


def test_smoothquant_nvfp4_w4a4_runs_and_keeps_its_scales(searched):
    # smooth: norms (the default) smooths the two norm-fed groups of each layer; every linear has its input scale
    cache = load_cache(searched("sq-nvfp4"))
    assert len(cache["scale"]) == 4 * 2 and len(cache["meta"]["input_amax"]) == 4 * 7


def test_mbq_nvfp4a16_on_the_moe_demo_searches_and_packs_per_expert(family_demo, tmp_path):
    """Qwen3-VL-MoE: grads → acts → MBQ NVFP4A16 search (per-expert groups included, never losing to RTN) → merge →
    pseudo and packed checkpoints in bf16, the packed experts (per expert) decompressing to the pseudo weights."""
    pytest.importorskip("compressed_tensors")
    from vlmquant.export.packed import export_packed
    from test_moe_packed import decompressed, in_pseudo_layout, tensors

    d, ref = family_demo("qwen3_vl_moe")
    spec = run_spec("mbq-nvfp4a16", method="mbq", w_bit=4, w_type="nvfp4", n_grid=5)
    names = {"model": "moe", "calib": "demo", "run": spec.name}
    P.run_grads(ref, d / "inputs.safetensors", tmp_path / "grads.safetensors")
    P.run_acts(ref, d / "inputs.safetensors", [0], tmp_path / "acts")
    P.run_search(ref, spec, d / "inputs.safetensors", tmp_path / "acts", tmp_path / "grads.safetensors",
                 [0, 1, 2, 3], tmp_path / "chunk_000", names)
    experts = 0
    for path in chunk_layer_files([tmp_path / "chunk_000"]):
        t, _ = load_layer(path)
        for losses, best in zip(t["losses"], t["best"]):
            assert best < 0 or losses[best] == losses.min() <= losses[0]
        for key in [k for k in t if k.endswith(".losses") and k.startswith("experts.")]:
            per_expert, chosen = t[key], t[key.replace(".losses", ".best")]
            assert (per_expert.gather(1, chosen[:, None])[:, 0] <= per_expert[:, 0]).all()
            experts += 1
    assert experts == 3  # the MoE layers' up → down groups (the last demo layer is dense)
    merge(chunk_layer_files([tmp_path / "chunk_000"]), tmp_path / "cache.pt", tmp_path / "search.parquet",
          {**names, "run_config": spec.search_params()})
    bf16 = open_model({"family": "qwen3_vl_moe", "path": str(ref.path), "dtype": "bfloat16"}, "cpu")
    export_checkpoint(bf16, spec, tmp_path / "checkpoint", tmp_path / "cache.pt", names=names)
    export_packed(bf16, spec, tmp_path / "packed", tmp_path / "cache.pt", names=names)
    reference = tensors(tmp_path / "checkpoint")
    dense = in_pseudo_layout(decompressed(tmp_path / "packed", "weight_packed", cast=False), reference, ref.adapter)
    differ = [k for k in reference if not torch.equal(dense[k], reference[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert any(".mlp.experts.7.gate_proj.weight_global_scale" in k for k in tensors(tmp_path / "packed"))


def test_streamed_exports_write_the_resident_bytes(searched, demo_model_path, w4a4_export, tmp_path):
    """With decoder layers streamed one at a time, the NVFP4 W4A4 pseudo and packed folders (fused global scales,
    static input scales) hold the very tensors of the resident exports."""
    from vlmquant.export.packed import export_packed
    from test_fp4_export import tensors

    spec = run_spec("mbq-nvfp4", **RUNS["mbq-nvfp4"])
    model = open_model({"family": "qwen2_vl", "path": str(demo_model_path), "dtype": "bfloat16"}, "cpu",
                       {"stream": "always"})
    names = {"model": "demo", "calib": "demo", "run": "mbq-nvfp4"}
    export_checkpoint(model, spec, tmp_path / "checkpoint", searched("mbq-nvfp4"), names=names)
    export_packed(model, spec, tmp_path / "packed", searched("mbq-nvfp4"), names=names)
    for resident, streamed in zip(w4a4_export, (tmp_path / "checkpoint", tmp_path / "packed")):
        a, b = tensors(resident), tensors(streamed)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (runtime_activations(tmp_path / "checkpoint")[2] == runtime_activations(w4a4_export[0])[2])
