"""GPTQ through the search job, the merge and both checkpoint formats on the tiny demo models (issue 26)."""
import dataclasses
import json

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from vlmquant.errors import VlmquantError
from vlmquant.export.checkpoint import export_checkpoint, stored_weights
from vlmquant.io import ragged, tensors
from vlmquant.io.scales import chunk_layer_files, load_cache, merge
from vlmquant.models import n_layers
from vlmquant.models.capture import load_layer_inputs, load_samples, model_inputs, token_masks
from vlmquant.quant.codes import QuantizedWeight, quantize_weight
from vlmquant.quant.model import layer_root
from vlmquant.search import pipeline as P
from vlmquant.search.grid import loss_tokens

from vlmquant.spec import RunSpec

from conftest import run_spec
from test_search_pipeline import NAMES, staged  # noqa: F401  (the module-scoped demo inputs, grads, acts)

GPTQ_FP = run_spec("gptq", method="gptq", w_bit=3, w_group=128, gptq_inputs="fp")


def search_all(staged, out, per_job, spec, grads=None):
    """Search the 4 demo layers in chunks of per_job (chained runs start from the previous chunk's folder), merge."""
    d, model = staged
    folders = []
    for a in range(0, 4, per_job):
        start = folders[-1] if spec.chained and a else d / "acts"
        folders.append(out / f"chunk_{a:03d}")
        P.run_search(model, spec, d / "inputs.safetensors", start, grads or d / "grads.safetensors",
                     list(range(a, min(a + per_job, 4))), folders[-1], {**NAMES, "run": spec.name})
    merge(chunk_layer_files(folders), out / "cache.pt", out / "search.parquet",
          {**NAMES, "run": spec.name, "run_config": spec.search_params()})
    return out / "cache.pt"


@pytest.mark.parametrize("cfg", [dict(method="gptq"), dict(method="mbq", gptq=True, n_grid=4)])
def test_chunked_equals_unchunked(staged, tmp_path, cfg):
    """GPTQ on quantized inputs chains the chunks: one layer per job gives the very bytes of one job."""
    spec = run_spec("r", w_bit=3, **cfg)
    assert spec.chained
    one = search_all(staged, tmp_path / "one", 4, spec)
    assert search_all(staged, tmp_path / "per_layer", 1, spec).read_bytes() == one.read_bytes()
    cache = load_cache(one)
    assert len(cache["gptq"]) == 4 * 7  # q k v o gate up down per layer
    assert bool(cache["scale"]) == (cfg["method"] == "mbq")


@torch.no_grad()
def test_layer_output_error_is_at_most_rtn_for_every_linear(staged, tmp_path):
    """On each layer's fp calibration inputs (gptq_inputs fp), Σ ||(W - Ŵ) x||² over the loss tokens, computed here
    from the linears' captured inputs, is ≤ round to nearest's for the stored GPTQ codes of every linear."""
    d, model = staged
    cache = load_cache(search_all(staged, tmp_path, 2, GPTQ_FP))
    masks = token_masks(ragged.collate(load_samples(d / "inputs.safetensors")[0]))
    keep = loss_tokens(masks, True)
    layers = model.load_layers(range(4))
    table = pd.read_parquet(tmp_path / "search.parquet")
    assert len(table) == 28 and table["note"].isna().all() and (table["group"] == "gptq").all()
    for i in range(4):
        layer = layers[i]
        hidden, args, _ = load_layer_inputs(d / "acts" / f"layer_{i:03d}.safetensors", "cpu", torch.float32)
        inputs, hooks = {}, []
        for name, lin in layer.named_modules():
            if isinstance(lin, torch.nn.Linear):
                hooks.append(lin.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0])))
        layer(hidden, **args.kwargs(i))
        for h in hooks:
            h.remove()
        for name, x in inputs.items():
            entry = cache["gptq"][f"layers.{i}.{name}"]
            w = layer.get_submodule(name).weight
            group = w.shape[1] // entry["scale"].shape[1]
            q = QuantizedWeight(entry["codes"], entry["scale"], entry.get("zero_point"), group).dequantize()
            x = x.reshape(-1, x.shape[-1])[keep].double()
            err = ((x @ (w - q).double().T) ** 2).sum()
            rtn = ((x @ (w - quantize_weight(w, GPTQ_FP.scheme).dequantize()).double().T) ** 2).sum()
            assert err <= rtn, (i, name)
            assert err < 0.95 * rtn or w.shape[1] <= 128, (i, name)  # GPTQ compensates across groups
            row = table[(table.layer == i) & (table.linears == name)].iloc[0]
            n = int(keep.sum())
            assert row.tokens == n
            assert row.loss == pytest.approx(float(err) / n / w.shape[0], rel=1e-3)
            assert row.rtn_loss == pytest.approx(float(rtn) / n / w.shape[0], rel=1e-3)


def test_modality_with_ratio_one_equals_uniform(staged, tmp_path):
    """hessian modality with ρ = 1 at every layer gives the codes of hessian uniform; other ρ change them."""
    d, _ = staged
    grads, meta = tensors.load(d / "grads.safetensors")
    assert all((v != 1).any() for k, v in grads.items() if k.endswith(".ratio"))
    tensors.save(tmp_path / "grads_one.safetensors",
                 {k: torch.ones_like(v) if k.endswith(".ratio") else v for k, v in grads.items()}, meta)
    modality = run_spec("gptq", method="gptq", w_bit=3, hessian="modality", gptq_inputs="fp")
    uniform = load_cache(search_all(staged, tmp_path / "u", 4, GPTQ_FP))["gptq"]
    at_one = load_cache(search_all(staged, tmp_path / "m1", 4, modality, tmp_path / "grads_one.safetensors"))["gptq"]
    weighted = load_cache(search_all(staged, tmp_path / "m", 4, modality))["gptq"]
    for name, entry in uniform.items():
        for k, v in entry.items():
            assert torch.equal(v, at_one[name][k]), (name, k)
    assert any(not torch.equal(entry["codes"], weighted[name]["codes"]) for name, entry in uniform.items())


def test_non_gptq_layer_files_carry_no_gptq_entries(staged, tmp_path):
    spec = run_spec("awq", method="awq", w_bit=3, n_grid=2)
    cache = load_cache(search_all(staged, tmp_path, 4, spec))
    assert set(cache) == {"scale", "meta"}


@pytest.mark.parametrize("cfg, key", [
    (dict(method="gptq", a_bit=8), "a_bit"),
    (dict(method="awq", hessian="uniform"), "hessian"),
    (dict(method="mbq", gptq=True, gptq_inputs="both"), "gptq_inputs"),
    (dict(method="gptq", dampening=-1), "dampening"),
    (dict(method="gptq", act_order="yes"), "act_order"),
    (dict(method="gptq", gptq=True), "gptq"),
    (dict(method="rtn", gptq=True), "gptq"),
    (dict(method="mbq", gptq=True, scale_cache="x.pt"), "scale_cache"),
])
def test_bad_gptq_settings_are_one_line_naming_the_key(cfg, key):
    with pytest.raises(VlmquantError) as e:
        run_spec("r", w_bit=4, **cfg)
    assert f"runs.r.{key}:" in str(e.value) and "\n" not in str(e.value)


def test_gptq_defaults():
    mbq = run_spec("r", method="mbq", w_bit=4, gptq=True)
    assert (mbq.hessian, mbq.dampening, mbq.act_order, mbq.gptq_inputs, mbq.needs_grads) == \
        ("modality", 0.01, False, "quantized", True)
    alone = run_spec("r", method="gptq", w_bit=4)
    assert (alone.hessian, alone.needs_grads, alone.has_scales, alone.searches, alone.has_cache) == \
        ("uniform", False, False, True, True)
    assert run_spec("r", method="gptq", w_bit=4, hessian="modality").needs_grads
    plain = run_spec("r", method="mbq", w_bit=4)
    assert plain.config() == {"method": "mbq", "w_bit": 4, "w_group": 128, "loss": "mae", "n_grid": 20,
                              "reweight": True}  # unchanged: non-GPTQ runs keep their caches' bytes


def export_both(model, spec, cache, out, load=True):
    """The pseudo and packed checkpoints of a run → (pseudo model, packed model loaded dequantized) if `load`."""
    from vlmquant.export.packed import export_packed, load_dequantized

    names = {**NAMES, "run": spec.name}
    spec = RunSpec.from_params(spec.name, spec.export_params())  # what the export jobs get
    export_checkpoint(model, spec, out / "checkpoint", cache, names=names)
    export_packed(model, spec, out / "packed", cache, names=names)
    if not load:
        return None
    cls = type(model.load())
    return cls.from_pretrained(out / "checkpoint").eval(), load_dequantized(cls, out / "packed").eval()


def assert_packed_equals_pseudo_and_stored(pseudo, packed, cache, adapter, batch):
    """Equal logits and weights; every GPTQ weight of the pseudo model is (code - zero_point) x scale as stored."""
    with torch.no_grad():
        assert torch.equal(pseudo(**batch).logits, packed(**batch).logits)  # first forward decompresses
    a, b = packed.state_dict(), pseudo.state_dict()
    assert not [k for k in b if k in a and not torch.equal(a[k], b[k])]
    root = layer_root(pseudo, adapter)
    for name, entry in cache["gptq"].items():
        w = root.get_parameter(name if entry["codes"].dim() == 3 else f"{name}.weight")
        for e, q in enumerate(stored_weights(entry)):
            assert torch.equal(w if w.dim() == 2 else w[e], q.dequantize(w.dtype)), name


@pytest.mark.parametrize("cfg", [dict(method="gptq", act_order=True), dict(method="mbq", gptq=True, n_grid=4)])
def test_packed_equals_pseudo_equals_stored_codes(staged, tmp_path, cfg):
    d, model = staged
    spec = run_spec("r", w_bit=4, **cfg)
    cache = search_all(staged, tmp_path, 4, spec)
    pseudo, packed = export_both(model, spec, cache, tmp_path)
    batch = model_inputs(ragged.collate(load_samples(d / "inputs.safetensors")[0]), "cpu", torch.float32)
    assert_packed_equals_pseudo_and_stored(pseudo, packed, load_cache(cache), model.adapter, batch)
    group = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert group["group_0"]["weights"].get("actorder") == ("weight" if spec.act_order else None)
    streamed = dataclasses.replace(model, stream="always")  # layer by layer: the same bytes
    export_checkpoint(streamed, spec, tmp_path / "streamed", cache, names={**NAMES, "run": spec.name})
    assert (tmp_path / "streamed" / "model.safetensors").read_bytes() == \
        (tmp_path / "checkpoint" / "model.safetensors").read_bytes()


def test_moe_experts_get_per_expert_gptq_and_pack_per_expert(family_demo, tmp_path):
    """Qwen3-VL-MoE: every fused expert weight is rounded per expert on its routed tokens (experts with too few
    fall back to RTN and the table says so); packed equals pseudo in every weight and logit."""
    d, model = family_demo("qwen3_vl_moe")
    n = n_layers(model.path)
    P.run_acts(model, d / "inputs.safetensors", [0], d / "acts")
    spec = run_spec("r", method="gptq", w_bit=4, w_group=32)
    P.run_search(model, spec, d / "inputs.safetensors", d / "acts", None, list(range(n)), tmp_path / "s",
                 {**NAMES, "run": "r"})
    merge(chunk_layer_files([tmp_path / "s"]), tmp_path / "cache.pt", tmp_path / "search.parquet",
          {**NAMES, "run": "r", "run_config": spec.search_params()})
    cache = load_cache(tmp_path / "cache.pt")
    fused = {k: v for k, v in cache["gptq"].items() if v["codes"].dim() == 3}
    assert fused and all(v["codes"].shape[0] == 8 for v in fused.values())
    table = pd.read_parquet(tmp_path / "search.parquet")
    experts = table[table.expert.notna()]
    assert len(experts) == 8 * len(fused)
    rtn = experts[experts.tokens < 16]
    assert len(rtn) and rtn.note.str.contains("rounded to nearest").all() and experts[experts.tokens >= 16].note.isna().all()
    for k, v in fused.items():
        assert v["rtn"].tolist() == (table[(table.linears == k.split(".", 2)[2]) & (table.layer == int(k.split(".")[1]))]
                                     .sort_values("expert").tokens < 16).tolist()
    # transformers does not load Qwen3-VL-MoE's per-expert packed experts: compressed-tensors decompresses them
    from test_moe_packed import decompressed, in_pseudo_layout, tensors

    export_both(model, spec, tmp_path / "cache.pt", tmp_path, load=False)
    reference = tensors(tmp_path / "checkpoint")
    dense = in_pseudo_layout(decompressed(tmp_path / "packed"), reference, model.adapter)
    assert not [k for k in reference if not torch.equal(dense[k], reference[k])]
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text((tmp_path / "checkpoint" / "config.json").read_text())
    save_file(dense, tmp_path / "dense" / "model.safetensors", metadata={"format": "pt"})
    cls = type(model.load())
    pseudo, unpacked = (cls.from_pretrained(tmp_path / f).eval() for f in ("checkpoint", "dense"))
    batch = model_inputs(ragged.collate(load_samples(d / "inputs.safetensors")[0]), "cpu", torch.float32)
    assert_packed_equals_pseudo_and_stored(pseudo, unpacked, cache, model.adapter, batch)


class Wildcards(dict):
    """Snakemake's wildcards: items and attributes."""
    __getattr__ = dict.__getitem__


@pytest.mark.parametrize("cfg, chained", [(dict(method="gptq"), True), (dict(method="gptq", gptq_inputs="fp"), False),
                                          (dict(method="mbq", gptq=True, gptq_inputs="fp"), False),
                                          (dict(method="mbq", distort=True), True), (dict(method="mbq"), False)])
def test_search_jobs_chain_only_for_quantized_inputs(cfg, chained):
    """A later chunk of a chained run starts from the previous chunk's folder; other runs' from the fp acts."""
    from vlmquant import paths
    from vlmquant.workflow import search_start

    from conftest import default_config

    config = default_config()  # the demo: 4 layers, 2 per job
    spec = run_spec("r", w_bit=3, **cfg)
    ids = dict(model="demo-qwen2vl", calib="demo", run="r")
    start = search_start(config, spec, Wildcards(**ids, chunk=paths.chunk_id(2)))
    assert start == (paths.SCALES.format(**ids, chunk=paths.chunk_id(0)) if chained else paths.ACTS.format(**ids))
    assert search_start(config, spec, Wildcards(**ids, chunk=paths.chunk_id(0))) == paths.ACTS.format(**ids)
