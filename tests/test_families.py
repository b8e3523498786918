"""Every non-default model family on its demo model: inputs, the search pipeline, lazy loading,
export and eval, called as library functions. Family-specific behaviour: test_families_today.py
(Qwen3-VL, Qwen3.5, Gemma 3) and test_moe.py (mixture of experts)."""
import pandas as pd
import pytest
import torch
import transformers

from safetensors.torch import load_file

from vlmquant.data.calib import build_calib, read_calib
from vlmquant.data.inputs import build_inputs
from vlmquant.errors import VlmquantError
from vlmquant.eval.run import run_eval, run_fp_reference
from vlmquant.eval.table import read_table
from vlmquant.export import export_checkpoint
from vlmquant.io import ragged
from vlmquant.io.scales import chunk_layer_files, load_cache, merge
from vlmquant.models import family_names, get_adapter
from vlmquant.quant.model import apply_scale_cache, pseudo_quantize
from vlmquant.search import pipeline as P
from vlmquant.models.capture import capture_layer_inputs, load_samples, model_inputs

from conftest import run_spec
from test_calib import coco_cfg

FAMILIES = [f for f in family_names() if f != "qwen2_vl"]  # qwen2_vl: the demo, tested everywhere else
RUN = run_spec("mbq", method="mbq", w_bit=3, n_grid=10)
CHEAP = run_spec("awq", method="awq", w_bit=3, n_grid=2)  # for properties any run has (chunking)
NAMES = {"model": "demo", "calib": "demo", "run": "mbq"}
META = {**NAMES, "run_config": RUN.search_params()}
EVAL = {"batch_size": 4, "kl_top_k": 0, "hidden_positions": 16}
N_LAYERS = 4


@pytest.fixture(scope="module", params=FAMILIES)
def staged(request, family_demo):
    """One family's demo model, a 4-sample calibration set (seed 5: OneVision tile counts differ),
    its inputs, gradients, the fp inputs of every layer, and the merged scale cache of one search job over
    all layers."""
    d, model = family_demo(request.param)
    P.run_grads(model, d / "inputs.safetensors", d / "grads.safetensors")
    P.run_acts(model, d / "inputs.safetensors", list(range(N_LAYERS)), d / "acts")
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
    bos = processor.tokenizer.bos_token_id
    for row, s in zip(rows, samples):
        ids, cap = s["input_ids"][0], s["caption_mask"][0]
        assert bos is None or ids[1] != bos  # a chat template writing <bos>: encoded without a second one
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


def test_inputs_mark_vision_and_caption_tokens(staged, demo_data, tmp_path):
    d, ref = staged
    adapter = ref.adapter
    model = fp_model(ref)
    processor = ref.processor()
    plain, _ = load_samples(d / "inputs.safetensors")
    check_inputs(adapter, model, processor, read_calib(d / "calib.parquet"), plain)
    # two images per sample (few-shot)
    build_calib(coco_cfg(demo_data, format="few_shot", n_samples=2), tmp_path / "c.parquet")
    build_inputs(tmp_path / "c.parquet", ref, tmp_path / "inputs.safetensors")
    two, _ = load_samples(tmp_path / "inputs.safetensors")
    check_inputs(adapter, model, processor, read_calib(tmp_path / "c.parquet"), two)
    if adapter.family == "llava_onevision":
        # a single image in AnyRes tiles (different counts here), each of several images in one tile
        assert len({int(s["pixel_values"].shape[0]) for s in plain}) > 1
        assert all(s["batch_num_images"].tolist() == [2] and s["pixel_values"].shape[0] == 2 for s in two)


def test_gradients_reach_every_layer_kind(staged):
    """The attention and MLP sites of every layer (o_proj or a linear attention's out_proj, down_proj or a MoE
    block) see caption gradients; vision positions reach the loss through the layers after them only."""
    d, _ = staged
    g = load_file(d / "grads.safetensors")
    for site in ("attn", "mlp"):
        assert (g[f"{site}.cap"] > 0).all() and (g[f"{site}.vis"][:-1] > 0).all() and g[f"{site}.vis"][-1] == 0
        assert torch.isfinite(g[f"{site}.ratio"]).all()


def test_search_never_loses_to_rtn_and_scales_keep_fp_logits(staged):
    d, ref = staged
    table = pd.read_parquet(d / "search.parquet")
    layers = ref.load_layers(range(N_LAYERS))
    # one row per group (4 query/key/value heads: v_proj → o_proj applies), one per expert in per-expert groups
    assert table.groupby(["layer", "group"]).ngroups == sum(len(ref.adapter.resolve_groups(l, i)) for i, l in layers.items())
    assert table["note"].isna().all() and (table["loss"] <= table["rtn_loss"]).all()
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


def test_chunked_and_unchunked_searches_give_identical_caches(staged, tmp_path):
    """Each layer's search starts from the acts file of its chunk (layer kwargs per type, deepstack additions
    after the layers it runs): one job over all layers and one job per layer write the same cache."""
    d, model = staged
    caches = []
    for per_job in (N_LAYERS, 1):
        folders = []
        for a in range(0, N_LAYERS, per_job):
            folders.append(tmp_path / f"{per_job}" / f"chunk_{a:03d}")
            P.run_search(model, CHEAP, d / "inputs.safetensors", d / "acts", None, list(range(a, a + per_job)),
                         folders[-1], {**NAMES, "run": "awq"})
        merge(chunk_layer_files(folders), tmp_path / f"{per_job}.pt", tmp_path / f"{per_job}.parquet",
              {**NAMES, "run": "awq", "run_config": CHEAP.search_params()})
        caches.append((tmp_path / f"{per_job}.pt").read_bytes())
    assert caches[0] == caches[1]


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
    fp = fp_model(model).state_dict()
    ref = fp_model(model)
    apply_scale_cache(ref, adapter, load_cache(d / "cache.pt"))
    folded = {k: v.clone() for k, v in ref.state_dict().items()}
    pseudo_quantize(ref, adapter, RUN)
    want, got = ref.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # vision tower, projector, embeddings, lm_head, final norm: every tensor as in the fp model
    decoder = adapter.layers_path + "."
    assert all(torch.equal(got[k], fp[k]) for k in fp if not k.startswith(decoder))
    # routers and keep_fp linears: scaled with their group, never quantized; fused experts quantized
    kept = [k for k in fp if k.startswith(decoder) and k.rsplit(".", 1)[0].split(".", 4)[4] in
            ("mlp.gate", *adapter.keep_fp)]
    assert all(torch.equal(got[k], folded[k]) for k in kept)
    experts = [k for k in fp if k.endswith(tuple(adapter.expert_weights)) and k.startswith(decoder)]
    assert all(not torch.equal(got[k], folded[k]) for k in experts)
    assert bool(kept) == (adapter.family in ("qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")) and \
        bool(experts) == adapter.family.endswith("_moe")
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
