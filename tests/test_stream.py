"""Layer-streamed stages (memory.stream) give what the whole model resident gives, holding one decoder layer at a
time; micro-batched searches pick the same alpha; the streamed writers write the same bytes."""
import dataclasses
import os

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import open_demo, run_spec
from test_calib import coco_cfg
from vlmquant.data.calib import build_calib
from vlmquant.data.inputs import build_inputs
from vlmquant.errors import VlmquantError
from vlmquant.eval.run import run_eval, run_fp_reference
from vlmquant.export import export_checkpoint
from vlmquant.io import ragged
from vlmquant.io.scales import save_cache
from vlmquant.models import family_names, memory, stream
from vlmquant.models.base import Adapter, in_width, layer_part
from vlmquant.models.loading import meta_model
from vlmquant.search import pipeline as P
from vlmquant.models.capture import LayerArgs, load_layer_inputs, load_samples, token_masks
from vlmquant.search.layer import quantized_forward, search_layer
from vlmquant.search.plan import group_period, plan_layer
from vlmquant.search.records import record_layer

SETTINGS = {"batch_size": 2, "kl_top_k": 0, "hidden_positions": 8}
NAMES = {"model": "demo", "calib": "demo", "run": "w4a8"}
# weight-activation run with an ignored group: eval quantizes inputs per layer, export skips a fold
W4A8 = run_spec("w4a8", ("mlp.down_proj",), method="mbq", w_bit=4, a_bit=8, n_grid=4)
MODES = ("never", "always")


@pytest.fixture(scope="module")
def staged(demo_data, demo_model_path, tmp_path_factory):
    """5 calibration samples (batches of 2 leave a short last batch) and a scale cache of random scales."""
    d = tmp_path_factory.mktemp("stream")
    model = open_demo(demo_model_path)
    build_calib(coco_cfg(demo_data, n_samples=5), d / "calib.parquet")
    build_inputs(d / "calib.parquet", model, d / "inputs.safetensors")
    layers = model.adapter.layers(model.load())
    g = torch.Generator().manual_seed(1)
    entries = [(f"layers.{i}.{grp.prev}", tuple(f"layers.{i}.{n}" for n in grp.linears),
                torch.rand(layer.get_submodule(grp.linears[0]).in_features, generator=g) + 0.5)
               for i, layer in enumerate(layers) for grp in model.adapter.resolve_groups(layer, i)]
    save_cache({"scale": entries}, d / "cache.pt")
    return d, model


@pytest.fixture(scope="module")
def runs(staged):
    """Every model stage run resident and streamed; streamed runs never load the whole model and hold at most
    one decoder layer (plus the shell) at a time."""
    d, model = staged
    inputs, held = d / "inputs.safetensors", []
    load_layer = stream.StreamedModel.layer

    def counting_layer(self, i):
        layer = load_layer(self, i)
        held.append(sum(any(not p.is_meta for p in m.parameters()) for m in self.layers))
        return layer

    for mode in MODES:
        out, ref = d / mode, dataclasses.replace(model, stream=mode)
        with pytest.MonkeyPatch.context() as mp:
            if mode == "always":
                mp.setattr(stream.StreamedModel, "layer", counting_layer)
                mp.setattr(Adapter, "load_model", lambda *a, **k: pytest.fail("a streamed stage loaded the whole model"))
            P.run_acts(ref, inputs, [0, 3], out / "acts")
            P.run_grads(ref, inputs, out / "grads.safetensors", batch_size=2)
            export_checkpoint(ref, W4A8, out / "checkpoint", d / "cache.pt", max_shard_size="3MB", names=NAMES)
            run_fp_reference(ref, inputs, out / "fp.safetensors", out / "fp.parquet", SETTINGS, {"model": "demo"})
            run_eval(ref, out / "checkpoint", inputs, out / "fp.safetensors", out / "eval.parquet", SETTINGS, NAMES)
    assert held and max(held) == 1
    return d


def files(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def test_streamed_acts_are_the_resident_files(runs):
    assert files(runs / "never/acts") == files(runs / "always/acts")


def test_micro_batched_acts_match(staged, runs, tmp_path):
    """One sample at a time through the shell (padded to the batch's length) and through every layer."""
    d, model = staged
    P.run_acts(dataclasses.replace(model, stream="always", max_batch_mb=1), d / "inputs.safetensors", [0, 3],
               tmp_path / "acts")
    for name in ("layer_000.safetensors", "layer_003.safetensors"):
        a, b = load_file(runs / "never/acts" / name), load_file(tmp_path / "acts" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


def test_streamed_grads_equal_resident(runs):
    a, b = load_file(runs / "never/grads.safetensors"), load_file(runs / "always/grads.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["attn.ratio"], a["mlp.ratio"])  # real statistics


def test_streamed_grads_in_rounds_equal_one_pass(staged, runs, tmp_path):
    d, model = staged
    P.run_grads(dataclasses.replace(model, stream="always", grads_store_mb=1), d / "inputs.safetensors",
                tmp_path / "g.safetensors", batch_size=2)
    a, b = load_file(runs / "never/grads.safetensors"), load_file(tmp_path / "g.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_store_plan_rounds():
    assert memory.plan_store([3, 3, 3], "cpu", max_store_bytes=6) == ("device", [[0, 1], [2]])
    assert memory.plan_store([3, 3, 3], "cpu", max_store_bytes=1) == ("device", [[0], [1], [2]])
    assert memory.plan_store([3, 3, 3], "cpu") == ("device", [[0, 1, 2]])


def test_streamed_checkpoint_is_the_resident_one_byte_for_byte(runs):
    a, b = files(runs / "never/checkpoint"), files(runs / "always/checkpoint")
    assert a.keys() == b.keys() and "model.safetensors.index.json" in a and "scales.safetensors" in a
    assert [f for f in a if a[f] != b[f]] == []


def test_streamed_eval_tables_equal_resident(runs):
    for table in ("fp.parquet", "eval.parquet"):
        a, b = pd.read_parquet(runs / "never" / table), pd.read_parquet(runs / "always" / table)
        assert a.equals(b)
    a = load_file(runs / "never/fp.safetensors")
    b = load_file(runs / "always/fp.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    table = pd.read_parquet(runs / "always/eval.parquet")
    assert (table.loc[table.metric == "kl", "value"] > 0).all()  # the W4A8 checkpoint differs from fp


def test_streamed_packed_checkpoint_is_the_resident_one(staged, tmp_path):
    pytest.importorskip("compressed_tensors")
    from vlmquant.export.packed import export_packed

    d, model = staged
    spec = run_spec("w4", ("layers.1.mlp.down_proj",), method="mbq", w_bit=4, w_group=128)
    out = {}
    for mode in MODES:
        export_packed(dataclasses.replace(model, stream=mode), spec, tmp_path / mode, d / "cache.pt",
                      max_shard_size="2MB", names={**NAMES, "run": "w4"})
        out[mode] = files(tmp_path / mode)
    assert len([f for f in out["never"] if f.endswith(".safetensors")]) > 2
    assert out["never"] == out["always"]


SEARCHES = [(W4A8, {"attn": 2.0, "mlp": 1.5}), (run_spec("awq", method="awq", w_bit=3, n_grid=4), None)]


@pytest.mark.parametrize("spec, ratios", SEARCHES, ids=["w4a8", "awq"])
def test_micro_batched_search_picks_the_same_alpha(staged, runs, spec, ratios):
    d, model = staged
    assert_searches_match(model, runs / "never/acts/layer_000.safetensors", d / "inputs.safetensors", spec, ratios,
                          ((None, False), (2, False)))


@pytest.mark.gpu
@pytest.mark.parametrize("spec, ratios", SEARCHES, ids=["w4a8", "awq"])
def test_host_records_pick_the_same_alpha_on_the_gpu(staged, runs, spec, ratios):
    """Micro-batches of 2 samples with the scale groups' records on the GPU and in pinned host memory."""
    torch.backends.cuda.matmul.allow_tf32 = False
    d, model = staged
    acts, inputs = runs / "never/acts/layer_000.safetensors", d / "inputs.safetensors"
    hidden, args, _ = load_layer_inputs(acts, "cuda", torch.float32)
    layer = model.load_layers([0])[0].cuda()
    _, records = record_layer(layer, model.adapter.resolve_groups(layer, 0), hidden, args.kwargs(0), 2, host=True)
    kept = [t for r in records.values() for t in (r["x"], *(p["out"] for p in r["parts"]))]
    assert all(t.device.type == "cpu" and t.is_pinned() for t in kept)
    assert_searches_match(model, acts, inputs, spec, ratios, ((2, False), (2, True)), device="cuda", exact=True)


def assert_searches_match(model, acts, inputs, spec, ratios, settings, device="cpu", exact=False):
    """search_layer and quantized_forward on decoder layer 0 give the same alpha, losses and outputs under two
    `settings` (samples per micro-batch or None for all at once, whether the records are kept in host memory).
    exact: the outputs bit for bit, else to assert_close's tolerance."""
    hidden, args, _ = load_layer_inputs(acts, device, torch.float32)
    masks = token_masks(ragged.collate(load_samples(inputs)[0]), device)
    out = []
    for per_batch, host in settings:
        layer = model.load_layers([0])[0].to(device)
        plan = plan_layer(spec, layer, 0, model.adapter)
        results, fp_next = search_layer(layer, plan, hidden, args.kwargs(0), masks, spec, ratios, per_batch, host)
        out.append((results, fp_next, quantized_forward(layer, 0, plan.groups, results, spec, hidden, args.kwargs(0),
                                                        model.adapter, per_batch)))
    (first, fp_a, q_a), (second, fp_b, q_b) = out
    assert len(first) == len(plan.groups)
    for a, b in zip(first, second):
        assert torch.equal(torch.as_tensor(a.alpha), torch.as_tensor(b.alpha))
        torch.testing.assert_close(torch.as_tensor(a.losses), torch.as_tensor(b.losses), rtol=1e-5, atol=0)
    same = (lambda x, y: torch.testing.assert_close(x, y, rtol=0, atol=0)) if exact else torch.testing.assert_close
    same(fp_a, fp_b)
    same(q_a, q_b)


def test_micro_batch_sizes_and_kwarg_splits():
    assert memory.micro_batch(10, 100, 1000, None) == 10
    assert memory.micro_batch(10, 100, 1000, 350_000) == 3
    assert memory.micro_batch(10, 100, 1000, 10) == 1
    cos = torch.arange(3 * 4 * 5 * 2.).reshape(3, 4, 5, 2)  # M-RoPE: (3, B, T, D)
    kwargs = {"position_embeddings": (cos[0], cos), "cache_position": torch.arange(5), "use_cache": False}
    part = stream.split_kwargs(kwargs, 4, 5, 1, 3)
    assert torch.equal(part["position_embeddings"][0], cos[0, 1:3])
    assert torch.equal(part["position_embeddings"][1], cos[:, 1:3])
    assert torch.equal(part["cache_position"], torch.arange(5)) and part["use_cache"] is False


def test_auto_streams_only_what_does_not_fit(staged, monkeypatch):
    _, model = staged
    assert not memory.use_streaming("auto", model)  # a few MB against the host's memory
    monkeypatch.setattr(memory, "device_free_bytes", lambda device: 1000)
    assert memory.use_streaming("auto", model)
    assert memory.use_streaming("always", model) and not memory.use_streaming("never", model)
    with pytest.raises(VlmquantError, match="memory.stream: 'yes' is not one of auto, always, never"):
        memory.use_streaming("yes", model)


def random_cache(ref, path, seed=0):
    """A scale cache of scales in [1/2, 3/2) for every scale group of every decoder layer of `ref`: per expert for
    per-expert groups, repeating per head for a norm shared by the heads."""
    layers = ref.adapter.layers(meta_model(ref.adapter, ref.path))
    g = torch.Generator().manual_seed(seed)
    entries = []
    for i, layer in enumerate(layers):
        for grp in ref.adapter.resolve_groups(layer, i):
            w = layer_part(layer, grp.linears[0])
            shape = (w.shape[0], w.shape[2]) if grp.experts else (in_width(w),)
            s = torch.rand(shape, generator=g) + 0.5
            period = group_period(layer, grp, shape[-1])
            if period:
                s = s[:period].repeat(shape[-1] // period)
            entries.append((f"layers.{i}.{grp.prev}", tuple(f"layers.{i}.{n}" for n in grp.consumers), s))
    save_cache({"scale": entries}, path)
    return path


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


OTHER_FAMILIES = [f for f in family_names() if f != "qwen2_vl"]  # qwen2_vl: the module's demo above


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_every_family_streams_to_the_resident_results(family, family_demo, tmp_path):
    """acts (also in micro-batches of one sample), grads, the pseudo export of random scales (zero-centred norms,
    per-expert and head-shared groups folded), the fp reference and the eval of each other family's demo model,
    streamed and resident: Qwen3-VL's deepstack additions, Gemma 3's and Qwen3.5's per-layer-type arguments,
    fused MoE experts, LLaVA-style checkpoint names, OneVision's image_newline parameter, InternVL tiles."""
    d, model = family_demo(family)
    inputs, cache = d / "inputs.safetensors", random_cache(model, tmp_path / "cache.pt")
    spec = run_spec("w4", method="mbq", w_bit=4, w_group=64)
    for mode in MODES:
        out, ref = tmp_path / mode, dataclasses.replace(model, stream=mode)
        P.run_acts(ref, inputs, [0, 2], out / "acts")
        P.run_grads(ref, inputs, out / "grads.safetensors", batch_size=3)
        export_checkpoint(ref, spec, out / "checkpoint", cache, names={**NAMES, "run": "w4"})
        run_fp_reference(ref, inputs, out / "fp.safetensors", out / "fp.parquet", SETTINGS, {"model": "demo"})
        run_eval(ref, out / "checkpoint", inputs, out / "fp.safetensors", out / "eval.parquet", SETTINGS,
                 {**NAMES, "run": "w4"})
    P.run_acts(dataclasses.replace(model, stream="always", max_batch_mb=0), inputs, [0, 2], tmp_path / "micro")
    never, always = tmp_path / "never", tmp_path / "always"
    assert files(never / "checkpoint") == files(always / "checkpoint")
    # close, not equal: CPU kernels (MoE grouped_mm) round by the weights' memory alignment, which differs between
    # from_pretrained's memory-mapped file and a layer loaded alone (bit-equal on the qwen2_vl demo above)
    for name in ("acts/layer_000.safetensors", "acts/layer_002.safetensors", "grads.safetensors", "fp.safetensors"):
        assert_same_tensors(load_file(never / name), load_file(always / name))
    for name in ("layer_000.safetensors", "layer_002.safetensors"):  # one-sample batches keep a tensor equal in
        a, b = load_file(never / "acts" / name), load_file(tmp_path / "micro" / name)  # every sample broadcast
        assert_same_tensors(a, {k: b[k].expand_as(a[k]) for k in b})
    for table in ("fp.parquet", "eval.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(never / table), pd.read_parquet(always / table), rtol=1e-5)
    kl = pd.read_parquet(always / "eval.parquet").query("metric == 'kl'")["value"]
    assert (kl > 0).all()  # the scales and the 4-bit weights changed the model


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe", "gemma3", "qwen3_5"])
def test_streamed_packed_checkpoint_of_todays_families_is_the_resident_one(family, family_demo, tmp_path):
    """Random scales folded, every linear packed and the fused experts packed per expert."""
    pytest.importorskip("compressed_tensors")
    from vlmquant.export.packed import export_packed

    d, model = family_demo(family)
    cache, spec = random_cache(model, tmp_path / "cache.pt"), run_spec("w4", method="mbq", w_bit=4, w_group=64)
    out = {}
    for mode in MODES:
        record = export_packed(dataclasses.replace(model, stream=mode), spec, tmp_path / mode, cache,
                               names={**NAMES, "run": "w4"})
        out[mode] = files(tmp_path / mode)
    assert out["never"] == out["always"]
    assert bool(record["packed_experts"]) == family.endswith("_moe")


@pytest.mark.parametrize("family", ["qwen3_vl", "gemma3", "qwen3_vl_moe"])
def test_micro_batched_search_on_todays_families(family, family_demo, tmp_path):
    """One sample at a time: a deepstack layer, a Gemma 3 sliding-window layer, a MoE layer's per-expert groups."""
    d, model = family_demo(family)
    P.run_acts(model, d / "inputs.safetensors", [0], tmp_path)
    assert_searches_match(model, tmp_path / "layer_000.safetensors", d / "inputs.safetensors",
                          run_spec("mbq", method="mbq", w_bit=3, n_grid=4), {"attn": 1.5, "mlp": 2.0},
                          ((None, False), (1, False)))


def test_layer_args_split_and_join_by_sample():
    """A deepstack addition's mask splits by rows, its values by the masked tokens of those rows; joined again
    they are the whole batch's; a batch without the addition adds no rows."""
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    values = torch.arange(8.).reshape(4, 2)
    mask4 = torch.arange(27.).reshape(3, 1, 3, 3)
    args = LayerArgs([{"attention_mask": mask4, "flag": True}], [0, 0], {0: (mask, values)})
    parts = [(k, stream.split_args(args, 3, 3, s, s + k)) for s, k in ((0, 1), (1, 1), (2, 1))]
    assert torch.equal(parts[2][1].added[0][1], values[2:4]) and parts[1][1].added[0][1].shape == (0, 2)
    assert parts[0][1].sets[0]["attention_mask"].shape == (1, 1, 3, 3) and parts[0][1].sets[0]["flag"] is True
    joined = stream.cat_args([parts[0], parts[2]], 3)
    assert torch.equal(joined.added[0][0], mask[[0, 2]]) and torch.equal(joined.added[0][1], values[[0, 1, 2, 3]])
    no_image = LayerArgs(args.sets, [0, 0], {})
    joined = stream.cat_args([parts[0], (1, stream.split_args(no_image, 3, 3, 1, 2)), parts[2]], 3)
    assert torch.equal(joined.added[0][0], mask) and torch.equal(joined.added[0][1], values)
    assert joined.sets[0]["attention_mask"].shape == (3, 1, 3, 3)
