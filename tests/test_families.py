"""Every non-default model family on its demo model: inputs, the search pipeline, lazy loading,
export and eval, called as library functions."""
import pandas as pd
import pytest
import torch
import transformers

from vlmquant.data.calib import build_calib, read_calib
from vlmquant.data.inputs import build_inputs
from vlmquant.demo.dataset import write_demo_data
from vlmquant.demo.model import build_demo_model
from vlmquant.errors import VlmquantError
from vlmquant.eval.run import run_eval, run_fp_reference
from vlmquant.eval.table import read_table
from vlmquant.export import export_checkpoint
from vlmquant.io import ragged
from vlmquant.io.scales import load_cache, merge
from vlmquant.models import get_adapter
from vlmquant.models.loading import load_layers
from vlmquant.quant.model import apply_scale_cache, pseudo_quantize
from vlmquant.search import pipeline as P
from vlmquant.search.capture import capture_layer_inputs, load_samples, model_inputs

from test_calib import coco_cfg

FAMILIES = ("qwen2_5_vl", "llava", "llava_onevision", "internvl")
RUN = {"method": "mbq", "w_bit": 3, "w_group": 128, "reweight": True, "loss": "mae", "n_grid": 20}
META = {"model": "demo", "calib": "demo", "run": "mbq", "run_config": RUN}
EVAL = {"batch_size": 4, "kl_top_k": 0, "hidden_positions": 16}
N_LAYERS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("families") / "data")


@pytest.fixture(scope="module", params=FAMILIES)
def staged(request, data, tmp_path_factory):
    """One family's demo model, a 4-sample calibration set (seed 3: OneVision tile counts differ),
    its inputs, and the merged scale cache of one search job over all layers."""
    family = request.param
    d = tmp_path_factory.mktemp(family)
    model_cfg = {"family": family, "path": str(build_demo_model(d / "model", family)), "dtype": "float32"}
    build_calib(coco_cfg(data, n_samples=4, seed=3), d / "calib.parquet")
    build_inputs(d / "calib.parquet", model_cfg, d / "inputs.safetensors")
    P.run_grads(model_cfg, d / "inputs.safetensors", d / "grads.safetensors", device="cpu")
    P.run_acts(model_cfg, d / "inputs.safetensors", [0], [d / "acts0.safetensors"], device="cpu")
    layers = list(range(N_LAYERS))
    files = [d / f"layer_{i:03d}.safetensors" for i in layers]
    P.run_search(model_cfg, RUN, d / "inputs.safetensors", d / "acts0.safetensors", d / "grads.safetensors",
                 layers, files, META, device="cpu")
    merge(files, d / "cache.pt", d / "search.parquet", META)
    return d, model_cfg


def fp_model(model_cfg):
    return get_adapter(model_cfg["family"]).load_model(model_cfg["path"])


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
    d, model_cfg = staged
    adapter = get_adapter(model_cfg["family"])
    model = fp_model(model_cfg)
    processor = adapter.load_processor(model_cfg["path"])
    plain, _ = load_samples(d / "inputs.safetensors")
    check_inputs(adapter, model, processor, read_calib(d / "calib.parquet"), plain)
    # two images per sample (few-shot)
    build_calib(coco_cfg(data, format="few_shot", n_samples=2), tmp_path / "c.parquet")
    build_inputs(tmp_path / "c.parquet", model_cfg, tmp_path / "inputs.safetensors")
    two, _ = load_samples(tmp_path / "inputs.safetensors")
    check_inputs(adapter, model, processor, read_calib(tmp_path / "c.parquet"), two)
    if model_cfg["family"] == "llava_onevision":
        # a single image in AnyRes tiles (different counts here), each of several images in one tile
        assert len({int(s["pixel_values"].shape[0]) for s in plain}) > 1
        assert all(s["batch_num_images"].tolist() == [2] and s["pixel_values"].shape[0] == 2 for s in two)


def test_search_never_loses_to_rtn_and_scales_keep_fp_logits(staged):
    d, model_cfg = staged
    table = pd.read_parquet(d / "search.parquet")
    assert len(table) == N_LAYERS * 4  # 4 query/key/value heads: v_proj → o_proj applies
    assert (table["loss"] <= table["rtn_loss"]).all()
    adapter = get_adapter(model_cfg["family"])
    model = fp_model(model_cfg)
    batch = model_inputs(ragged.collate(load_samples(d / "inputs.safetensors")[0]), "cpu", torch.float32)
    cache = load_cache(d / "cache.pt")
    with torch.no_grad():
        before = model(**batch).logits
        apply_scale_cache(model, adapter, cache)
        after = model(**batch).logits
    assert ((after - before).abs().max() / before.abs().max()).item() <= 1e-3
    assert any(not torch.allclose(s, torch.ones_like(s)) for _, _, s in cache["scale"])


def test_lazy_layers_equal_from_pretrained(staged):
    _, model_cfg = staged
    adapter = get_adapter(model_cfg["family"])
    full = adapter.layers(fp_model(model_cfg))
    lazy = load_layers(adapter, model_cfg["path"], range(N_LAYERS), "cpu", torch.float32)
    for i, layer in lazy.items():
        want = full[i].state_dict()
        got = layer.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_export_reloads_and_evaluates(staged, tmp_path):
    d, model_cfg = staged
    adapter = get_adapter(model_cfg["family"])
    out = tmp_path / "checkpoint"
    run = {k: RUN[k] for k in ("method", "w_bit", "w_group")}
    export_checkpoint(model_cfg, run, out, d / "cache.pt", meta=META, device="cpu")
    loaded = getattr(transformers, adapter.model_class).from_pretrained(out).eval()
    ref = fp_model(model_cfg)
    apply_scale_cache(ref, adapter, load_cache(d / "cache.pt"))
    pseudo_quantize(ref, adapter, run)
    want, got = ref.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert adapter.load_processor(out).tokenizer.get_vocab() == adapter.load_processor(model_cfg["path"]).tokenizer.get_vocab()
    # eval: the fp reference and the checkpoint against it, on the calibration inputs
    ids = {"model": "demo", "eval_calib": "demo"}
    run_fp_reference(model_cfg, d / "inputs.safetensors", tmp_path / "fp.safetensors", tmp_path / "fp.parquet", EVAL,
                     ids, device="cpu")
    run_eval(model_cfg, out, d / "inputs.safetensors", tmp_path / "fp.safetensors", tmp_path / "eval.parquet", EVAL,
             {**ids, "calib": "demo", "run": "mbq"}, device="cpu")
    df, _ = read_table(tmp_path / "eval.parquet")
    kl = df[df.metric == "kl"].value
    assert len(kl) == 1 and kl.iloc[0] > 0
    hid = df[df.metric == "hidden_rel_mse"]
    assert set(hid.modality) == {"vision", "text"} and len(hid) == N_LAYERS * 2 and (hid.value > 0).all()
    assert len(df[df.metric == "weight_rel_err"]) == N_LAYERS


def test_folder_of_another_architecture_is_refused(staged):
    _, model_cfg = staged
    other = "llava" if model_cfg["family"] != "llava" else "internvl"
    with pytest.raises(VlmquantError, match=f"family {other} needs"):
        get_adapter(other).load_model(model_cfg["path"])
