"""Every non-default model family on its demo model: inputs, the search pipeline, lazy loading,
export and eval, called as library functions."""
import pandas as pd
import pytest
import torch
import transformers

from vlmquant.data.calib import build_calib, read_calib
from vlmquant.data.inputs import build_inputs
from vlmquant.demo.dataset import write_demo_data
from vlmquant.models.tiny import build_demo_model
from vlmquant.errors import VlmquantError
from vlmquant.eval.run import run_eval, run_fp_reference
from vlmquant.eval.table import read_table
from vlmquant.export import export_checkpoint
from vlmquant.io import ragged
from vlmquant.io.scales import chunk_layer_files, load_cache, merge
from vlmquant.models import family_names, get_adapter
from vlmquant.quant.model import apply_scale_cache, pseudo_quantize
from vlmquant.search import pipeline as P
from vlmquant.search.capture import capture_layer_inputs, load_samples, model_inputs

from conftest import open_demo, run_spec
from test_calib import coco_cfg

FAMILIES = [f for f in family_names() if f != "qwen2_vl"]  # qwen2_vl: the demo, tested everywhere else
RUN = run_spec("mbq", method="mbq", w_bit=3)
NAMES = {"model": "demo", "calib": "demo", "run": "mbq"}
META = {**NAMES, "run_config": RUN.search_params()}
EVAL = {"batch_size": 4, "kl_top_k": 0, "hidden_positions": 16}
N_LAYERS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("families") / "data")


@pytest.fixture(scope="module", params=FAMILIES)
def staged(request, data, tmp_path_factory):
    """One family's demo model, a 4-sample calibration set (seed 5: OneVision tile counts differ),
    its inputs, and the merged scale cache of one search job over all layers."""
    family = request.param
    d = tmp_path_factory.mktemp(family)
    model = open_demo(build_demo_model(d / "model", family), family)
    build_calib(coco_cfg(data, n_samples=4, seed=5), d / "calib.parquet")
    build_inputs(d / "calib.parquet", model, d / "inputs.safetensors")
    P.run_grads(model, d / "inputs.safetensors", d / "grads.safetensors")
    P.run_acts(model, d / "inputs.safetensors", [0], d / "acts")
    P.run_search(model, RUN, d / "inputs.safetensors", d / "acts", d / "grads.safetensors", list(range(N_LAYERS)),
                 d / "chunk", NAMES)
    merge(chunk_layer_files([d / "chunk"]), d / "cache.pt", d / "search.parquet", META)
    return d, model


def test_adapter_module_is_named_after_its_model_type():
    import transformers

    for family in family_names():
        adapter = get_adapter(family)
        assert getattr(transformers, adapter.model_class).config_class.model_type == family == adapter.family


def fp_model(model):
    return model.load()


def check_inputs(adapter, model, processor, rows, samples):
    """vision_mask = the positions the model fills with vision features; captions and labels."""
    batch = ragged.collate(samples)  # samples of different lengths and image sizes in one batch
    hidden, _ = capture_layer_inputs(model, adapter.layers(model), batch, "cpu", torch.float32)
    with torch.no_grad():
        text = model.get_input_embeddings()(batch["input_ids"])
    filled = (hidden != text).any(-1)  # (B, T)
    valid = batch["attention_mask"].bool()
    assert torch.equal(filled & valid, batch["vision_mask"].bool())
    for row, s in zip(rows, samples):
        ids, cap = s["input_ids"][0], s["caption_mask"][0]
        assert torch.equal(s["vision_mask"][0], torch.isin(ids, torch.tensor(adapter.image_token_ids(model.config))))
        captions = [t["text"] for t in row["turns"] if t["role"] == "assistant"]
        starts = (cap & ~torch.cat([torch.tensor([False]), cap[:-1]])).nonzero()[:, 0].tolist()
        assert len(starts) == len(captions)
        for start, caption in zip(starts, captions):
            end = start + int(cap[start:].int().cumprod(0).sum())
            decoded = processor.tokenizer.decode(ids[start:end])
            assert decoded in (caption, " " + caption)  # LLaVA: the caption's first token holds the space
        assert torch.equal(s["labels"][0] != -100, cap) and torch.equal(s["labels"][0][cap], ids[cap])
        assert not (cap & s["vision_mask"][0]).any()


def test_inputs_mark_vision_and_caption_tokens(staged, data, tmp_path):
    d, ref = staged
    adapter = ref.adapter
    model = fp_model(ref)
    processor = ref.processor()
    plain, _ = load_samples(d / "inputs.safetensors")
    check_inputs(adapter, model, processor, read_calib(d / "calib.parquet"), plain)
    # two images per sample (few-shot)
    build_calib(coco_cfg(data, format="few_shot", n_samples=2), tmp_path / "c.parquet")
    build_inputs(tmp_path / "c.parquet", ref, tmp_path / "inputs.safetensors")
    two, _ = load_samples(tmp_path / "inputs.safetensors")
    check_inputs(adapter, model, processor, read_calib(tmp_path / "c.parquet"), two)
    if adapter.family == "llava_onevision":
        # a single image in AnyRes tiles (different counts here), each of several images in one tile
        assert len({int(s["pixel_values"].shape[0]) for s in plain}) > 1
        assert all(s["batch_num_images"].tolist() == [2] and s["pixel_values"].shape[0] == 2 for s in two)


def test_search_never_loses_to_rtn_and_scales_keep_fp_logits(staged):
    d, ref = staged
    table = pd.read_parquet(d / "search.parquet")
    assert len(table) == N_LAYERS * 4  # 4 query/key/value heads: v_proj → o_proj applies
    assert (table["loss"] <= table["rtn_loss"]).all()
    adapter = ref.adapter
    model = fp_model(ref)
    batch = model_inputs(ragged.collate(load_samples(d / "inputs.safetensors")[0]), "cpu", torch.float32)
    cache = load_cache(d / "cache.pt")
    with torch.no_grad():
        before = model(**batch).logits
        apply_scale_cache(model, adapter, cache)
        after = model(**batch).logits
    assert ((after - before).abs().max() / before.abs().max()).item() <= 1e-3
    assert any(not torch.allclose(s, torch.ones_like(s)) for _, _, s in cache["scale"])


def test_lazy_layers_equal_from_pretrained(staged):
    _, ref = staged
    adapter = ref.adapter
    full = adapter.layers(fp_model(ref))
    lazy = ref.load_layers(range(N_LAYERS))
    for i, layer in lazy.items():
        want = full[i].state_dict()
        got = layer.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_export_reloads_and_evaluates(staged, tmp_path):
    d, model = staged
    adapter = model.adapter
    out = tmp_path / "checkpoint"
    export_checkpoint(model, RUN, out, d / "cache.pt", names=NAMES)
    loaded = getattr(transformers, adapter.model_class).from_pretrained(out).eval()
    ref = fp_model(model)
    apply_scale_cache(ref, adapter, load_cache(d / "cache.pt"))
    pseudo_quantize(ref, adapter, RUN)
    want, got = ref.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert adapter.load_processor(out).tokenizer.get_vocab() == model.processor().tokenizer.get_vocab()
    # eval: the fp reference and the checkpoint against it, on the calibration inputs
    ids = {"model": "demo", "eval_calib": "demo"}
    run_fp_reference(model, d / "inputs.safetensors", tmp_path / "fp.safetensors", tmp_path / "fp.parquet", EVAL, ids)
    run_eval(model, out, d / "inputs.safetensors", tmp_path / "fp.safetensors", tmp_path / "eval.parquet", EVAL,
             {**ids, "calib": "demo", "run": "mbq"})
    df, _ = read_table(tmp_path / "eval.parquet")
    kl = df[df.metric == "kl"].value
    assert len(kl) == 1 and kl.iloc[0] > 0
    hid = df[df.metric == "hidden_rel_mse"]
    assert set(hid.modality) == {"vision", "text"} and len(hid) == N_LAYERS * 2 and (hid.value > 0).all()
    assert len(df[df.metric == "weight_rel_err"]) == N_LAYERS


def test_folder_of_another_architecture_is_refused(staged):
    _, model = staged
    other = "llava" if model.adapter.family != "llava" else "internvl"
    with pytest.raises(VlmquantError, match=f"family {other} needs"):
        get_adapter(other).load_model(model.path)
