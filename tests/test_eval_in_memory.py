"""The eval of a run's weights made in memory from the fp model and the scale cache (eval.run.RunWeights) gives the
very table of the eval of its written pseudo checkpoint, bit for bit on CPU fp32, resident and streamed (issue 30)."""
import dataclasses
import json

import pandas as pd
import pytest
import torch

from conftest import run_spec
from test_gptq_pipeline import GPTQ_FP, search_all as search_gptq
from test_search_pipeline import NAMES, RUN, merged, staged  # noqa: F401  (module-scoped demo inputs, mbq cache)
from vlmquant.errors import VlmquantError
from vlmquant.eval.run import RunWeights, run_eval, run_fp_reference
from vlmquant.eval.table import read_table
from vlmquant.export.checkpoint import QUANT_FILE, export_checkpoint
from vlmquant.io.scales import save_cache

SETTINGS = {"batch_size": 3, "kl_top_k": 0, "hidden_positions": 8}
MODES = ("never", "always")


def random_cache(model, path, seed=1):
    """A scale cache of random scales for every scale group of the model's decoder layers."""
    layers = model.adapter.layers(model.load())
    g = torch.Generator().manual_seed(seed)
    entries = [(f"layers.{i}.{grp.prev}", tuple(f"layers.{i}.{n}" for n in grp.linears),
                torch.rand(layer.get_submodule(grp.linears[0]).in_features, generator=g) + 0.5)
               for i, layer in enumerate(layers) for grp in model.adapter.resolve_groups(layer, i)]
    save_cache({"scale": entries}, path)
    return path


def assert_same_tables(model, spec, cache, inputs, out):
    """Export the pseudo checkpoint, eval it and the run's weights in memory, resident and streamed: equal tables;
    the in-memory table records the quantization.json the checkpoint has (scale cache sha256, weights fingerprint)."""
    names = {**NAMES, "run": spec.name}
    export_checkpoint(model, spec, out / "checkpoint", cache, names=names)
    info = json.loads((out / "checkpoint" / QUANT_FILE).read_text())
    run_fp_reference(model, inputs, out / "fp.safetensors", out / "fp.parquet", SETTINGS, {"model": "demo"})
    for mode in MODES:
        ref = dataclasses.replace(model, stream=mode)
        tables = {}
        for kind, quantized in (("folder", out / "checkpoint"), ("memory", RunWeights(spec, cache, names))):
            run_eval(ref, quantized, inputs, out / "fp.safetensors", out / f"{kind}-{mode}.parquet", SETTINGS, names)
            tables[kind] = read_table(out / f"{kind}-{mode}.parquet")
        (folder, folder_meta), (memory, memory_meta) = tables["folder"], tables["memory"]
        pd.testing.assert_frame_equal(folder, memory, check_exact=True)
        assert (folder.query("metric == 'kl'")["value"] > 0).all()  # quantized: not the fp model
        assert memory_meta["quantization"] == {k: v for k, v in info.items() if k != "packages"}
        assert memory_meta["checkpoint"] is None and folder_meta["checkpoint"] == str(out / "checkpoint")
    if cache is not None:
        assert info["scale_cache_sha256"] and info["source_weights"]


def test_rtn(staged, tmp_path):
    d, model = staged
    assert_same_tables(model, run_spec("rtn", method="rtn", w_bit=4, w_group=128), None, d / "inputs.safetensors",
                       tmp_path)


def test_mbq_searched(staged, merged, tmp_path):
    d, model = staged
    assert_same_tables(model, RUN, merged, d / "inputs.safetensors", tmp_path)


def test_awq_w4a8_with_an_ignored_group(staged, tmp_path):
    """W4A8: the activations are quantized at run time in both; the ignored down_proj's group is not folded."""
    d, model = staged
    spec = run_spec("w4a8", ("mlp.down_proj",), method="awq", w_bit=4, a_bit=8)
    assert_same_tables(model, spec, random_cache(model, tmp_path / "cache.pt"), d / "inputs.safetensors", tmp_path)


def test_gptq(staged, tmp_path):
    """GPTQ: the merged cache's stored codes are the weights, in memory as in the checkpoint."""
    d, model = staged
    cache = search_gptq(staged, tmp_path / "search", per_job=4, spec=GPTQ_FP)
    assert_same_tables(model, GPTQ_FP, cache, d / "inputs.safetensors", tmp_path)


def test_nvfp4(staged, tmp_path):
    d, model = staged
    spec = run_spec("nvfp4", method="mbq", w_bit=4, w_type="nvfp4")
    assert_same_tables(model, spec, random_cache(model, tmp_path / "cache.pt"), d / "inputs.safetensors", tmp_path)


def test_moe(family_demo, tmp_path):
    """Qwen3-VL-MoE: fused experts fake-quantized per expert in memory as export writes them, equal to the checkpoint's
    weights bit for bit. The tables agree to float summation order only: in a pytest-xdist worker the checkpoint's
    model and the in-memory one can run the fused experts through different transformers implementations (KL and
    the MoE layers' hidden errors differed by 3e-6 relative there; bit for bit in one plain process)."""
    from safetensors.torch import load_file

    from vlmquant.export.checkpoint import pseudo_model

    d, model = family_demo("qwen3_vl_moe")
    spec = run_spec("rtn", method="rtn", w_bit=4, w_group=32)
    names = {**NAMES, "run": spec.name}
    export_checkpoint(model, spec, tmp_path / "checkpoint", None, names=names)
    saved = {}
    for f in sorted((tmp_path / "checkpoint").glob("model*.safetensors")):
        saved.update(load_file(f))
    memory = pseudo_model(model, spec, None, names)[0].state_dict()
    experts = [k for k in saved if ".mlp.experts." in k]
    assert experts and all(torch.equal(saved[k], memory[k]) for k in saved)
    inputs, ref = d / "inputs.safetensors", tmp_path / "fp.safetensors"
    run_fp_reference(model, inputs, ref, tmp_path / "fp.parquet", SETTINGS, {"model": "demo"})
    for mode in MODES:
        ref_model = dataclasses.replace(model, stream=mode)
        tables = []
        for kind, quantized in (("folder", tmp_path / "checkpoint"), ("memory", RunWeights(spec, None, names))):
            run_eval(ref_model, quantized, inputs, ref, tmp_path / f"{kind}-{mode}.parquet", SETTINGS, names)
            tables.append(read_table(tmp_path / f"{kind}-{mode}.parquet")[0])
        pd.testing.assert_frame_equal(*tables, check_exact=False, rtol=1e-5, atol=0)
        assert (tables[1].query("metric == 'kl'")["value"] > 0).all()


def test_a_cache_of_other_weights_is_refused(staged, tmp_path):
    """The in-memory eval checks the cache against the model folder as export does: a cache made for another model
    is one line naming the cache, before any forward."""
    d, model = staged
    cache = random_cache(model, tmp_path / "cache.pt")
    save_cache({"scale": [], "meta": {"model": "other"}}, cache)
    with pytest.raises(VlmquantError, match=f"^{cache}: scale cache is for model 'other', exporting 'demo'$"):
        run_eval(model, RunWeights(RUN, cache, NAMES), d / "inputs.safetensors", tmp_path / "fp.safetensors",
                 tmp_path / "eval.parquet", SETTINGS, NAMES)
    assert not (tmp_path / "eval.parquet").exists()
