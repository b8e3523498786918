"""Every non-default model family on its demo model: inputs, the search pipeline, lazy loading, export and eval,
called as library functions. Then what makes Qwen3-VL, Qwen3.5 and Gemma 3 different (issue 14), each on its tiny
demo model: scale groups by layer kind, groups skipped with a reason, deepstack replayed wherever layers run alone,
per-layer-type arguments, zero-centred and head-shared norm folds, Gemma's inputs. Mixture of experts:
test_moe.py."""
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
from vlmquant.export.checkpoint import quantize_in_memory
from vlmquant.io import ragged
from vlmquant.io.scales import chunk_layer_files, load_cache, merge, save_layer
from vlmquant.models import family_names, get_adapter
from vlmquant.models.capture import capture_layer_inputs, layer_forward, load_layer_inputs, load_samples, model_inputs
from vlmquant.models.loading import meta_model
from vlmquant.quant.fold import fold_scales
from vlmquant.quant.model import apply_scale_cache, pseudo_quantize
from vlmquant.search import pipeline as P
from vlmquant.search.grid import GroupResult

from conftest import run_spec
from test_calib import coco_cfg

FAMILIES = [f for f in family_names() if f != "qwen2_vl"]  # qwen2_vl: the demo, tested everywhere else
RUN = run_spec("mbq", method="mbq", w_bit=3, n_grid=10)
CHEAP = run_spec("awq", method="awq", w_bit=3, n_grid=2)  # for properties any run has (chunking)
NAMES = {"model": "demo", "calib": "demo", "run": "mbq"}
META = {**NAMES, "run_config": RUN.search_params()}
EVAL = {"batch_size": 4, "kl_top_k": 0, "hidden_positions": 16}
N_LAYERS = 4
DISTORT_NAMES = {"model": "demo", "calib": "demo", "run": "distort"}


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


# ---- what makes Qwen3-VL, Qwen3.5 and Gemma 3 different -----------------------------------------------
@torch.no_grad()
def hooked(model, adapter, batch):
    """Every decoder layer's (input hidden, kwargs, output) in one forward of the full model."""
    rec, handles = [], []
    for layer in adapter.layers(model):
        rec.append({})

        def pre(m, args, kwargs, r=rec[-1]):
            r["in"], r["kwargs"] = args[0], kwargs

        def post(m, args, out, r=rec[-1]):
            r["out"] = out[0] if isinstance(out, tuple) else out
        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post)]
    try:
        model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return rec


def batch_of(d, model):
    return model_inputs(ragged.collate(load_samples(d / "inputs.safetensors")[0]), "cpu", torch.float32)


def prevs(adapter, layer):
    return [g.prev for g in adapter.resolve_groups(layer)]


def test_scale_groups_are_looked_up_by_layer_kind(family_demo):
    """Qwen3.5: config.layer_types decides linear-attention or full-attention groups; Qwen3-VL-MoE: MoE layers
    and the dense layer of mlp_only_layers; Gemma 3: the MLP reads pre_feedforward_layernorm."""
    q35 = get_adapter("qwen3_5")
    layers = q35.layers(meta_model(q35, family_demo("qwen3_5")[0] / "model"))
    assert [q35.layer_kinds(layer) for layer in layers] == [("linear_attention", "mlp")] * 3 + [("attention", "mlp")]
    linear, full = q35.resolve_groups(layers[0]), q35.resolve_groups(layers[3])
    assert [g.prev for g in linear] == ["input_layernorm", "linear_attn.norm", "post_attention_layernorm", "mlp.up_proj"]
    assert linear[0].linears == ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z")
    assert linear[0].scaled == ("linear_attn.in_proj_b", "linear_attn.in_proj_a")  # scaled, kept fp
    assert [g.prev for g in full] == ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"]
    moe = get_adapter("qwen3_vl_moe")
    layers = moe.layers(meta_model(moe, family_demo("qwen3_vl_moe")[0] / "model"))
    assert [moe.layer_kinds(layer)[1] for layer in layers] == ["moe", "moe", "moe", "mlp"]
    assert prevs(moe, layers[0])[2:] == ["post_attention_layernorm", "mlp.experts.gate_up_proj"]
    assert prevs(moe, layers[3])[2:] == ["post_attention_layernorm", "mlp.up_proj"]
    gemma = get_adapter("gemma3")
    layer = gemma.layers(meta_model(gemma, family_demo("gemma3")[0] / "model"))[0]
    assert prevs(gemma, layer)[2:] == ["pre_feedforward_layernorm", "mlp.up_proj"]


def test_a_group_that_does_not_apply_is_skipped_and_the_search_table_says_why(tmp_path):
    """Grouped-query attention: v_proj's output is narrower than o_proj's input, no exact per-channel fold."""
    adapter = get_adapter("qwen3_vl")
    config = transformers.Qwen3VLTextConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=64, num_hidden_layers=1)
    layer = transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLTextDecoderLayer(config, 0)
    groups, skipped = adapter.layer_groups(layer, 0)
    assert [g.prev for g in groups] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    assert [(g.prev, why) for g, why in skipped] == [
        ("self_attn.v_proj", "self_attn.v_proj outputs 128 channels, self_attn.o_proj take 256 (grouped-query "
                             "attention: no exact per-channel fold)")]
    results = [GroupResult(torch.ones(256), 0.0, [1.0, 2.0], 0) for _ in groups]
    save_layer(tmp_path / "layer_000.safetensors", 0, groups, results, [None] * 3,
               {**DISTORT_NAMES, "skipped": adapter.skipped_groups(layer, 0)})
    merge([tmp_path / "layer_000.safetensors"], tmp_path / "c.pt", tmp_path / "t.parquet", DISTORT_NAMES)
    table = pd.read_parquet(tmp_path / "t.parquet")
    assert table["group"].tolist() == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj", "self_attn.v_proj"]
    assert table["note"].tolist()[-1].startswith("skipped: self_attn.v_proj outputs 128 channels")
    assert table["alpha"].isna().tolist() == [False, False, False, True]
    assert len(load_cache(tmp_path / "c.pt")["scale"]) == 3


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_deepstack_layers_get_what_the_full_model_feeds_them(family_demo, family, tmp_path):
    """The captured arguments plus the deepstack additions replay every layer's input exactly, from layer 0 and
    from the acts file of any chunk start; without the additions layers 1 and 2 would get other inputs."""
    d, ref = family_demo(family)
    adapter, model = ref.adapter, ref.load()
    batch = batch_of(d, model)
    rec = hooked(model, adapter, batch)
    layers = adapter.layers(model)
    hidden, args = capture_layer_inputs(model, layers, ragged.collate(load_samples(d / "inputs.safetensors")[0]),
                                        "cpu", torch.float32, adapter)
    assert sorted(args.added) == [0, 1]  # deepstack from vision blocks 0 and 1, added after decoder layers 0 and 1
    for i, layer in enumerate(layers):
        assert torch.equal(hidden, rec[i]["in"]), f"layer {i}"
        out = layer_forward(layer, hidden, args.kwargs(i))
        assert torch.equal(out, rec[i]["out"])
        if i in args.added:
            assert not torch.equal(out, rec[i + 1]["in"])
        hidden = args.after(i, out)
    P.run_acts(ref, d / "inputs.safetensors", [0, 1, 2, 3], tmp_path / "acts")
    for i in range(4):
        h, a, info = load_layer_inputs(tmp_path / "acts" / f"layer_{i:03d}.safetensors", "cpu", torch.float32)
        assert info["layer"] == i and sorted(a.added) == [j for j in (0, 1) if j >= i]
        assert torch.equal(h, rec[i]["in"]) and torch.equal(a.forward(layers[i], i, h), rec[i + 1]["in"] if i < 3 else
                                                            rec[i]["out"])


@torch.no_grad()
@pytest.mark.parametrize("distort", ["reference", "layer"])
def test_distort_chain_feeds_each_chunk_what_the_quantized_model_computes(family_demo, tmp_path, distort):
    """Qwen3-VL distort run in chunks of two layers: the next chunk's inputs are layer 2's inputs in the full
    pseudo-quantized model (deepstack added after layers 0 and 1 of the quantized chain), and for the reference's
    definition its fp chain layer 2's inputs in the fp model; one chunk per layer writes the same cache."""
    d, ref = family_demo("qwen3_vl")
    run = run_spec("distort", method="awq", w_bit=3, n_grid=2, distort=distort)
    caches = {}
    for per_job in (2, 1):
        folders = []
        for a in range(0, 4, per_job):
            start = folders[-1] if a else d / "acts-distort"
            if not a:
                P.run_acts(ref, d / "inputs.safetensors", [0], start)
            folders.append(tmp_path / f"{per_job}" / f"chunk_{a:03d}")
            P.run_search(ref, run, d / "inputs.safetensors", start, None, list(range(a, a + per_job)), folders[-1],
                         DISTORT_NAMES)
        caches[per_job] = tmp_path / f"{per_job}.pt"
        merge(chunk_layer_files(folders), caches[per_job], tmp_path / f"{per_job}.parquet",
              {**DISTORT_NAMES, "run_config": run.search_params()})
    assert caches[1].read_bytes() == caches[2].read_bytes()
    got, _, info = load_layer_inputs(tmp_path / "2" / "chunk_000" / "next_inputs.safetensors", "cpu", torch.float32)
    model = ref.load()
    fp_chain = tmp_path / "2" / "chunk_000" / "next_fp_inputs.safetensors"
    if distort == "reference":
        fp_got = load_layer_inputs(fp_chain, "cpu", torch.float32)[0]
        torch.testing.assert_close(fp_got, hooked(model, ref.adapter, batch_of(d, model))[2]["in"])
    else:
        assert not fp_chain.exists()
    quantize_in_memory(model, ref.adapter, run, load_cache(caches[2]))
    want = hooked(model, ref.adapter, batch_of(d, model))[2]["in"]
    assert info["layer"] == 2
    torch.testing.assert_close(got, want)


def test_gemma_layers_get_the_arguments_of_their_type(family_demo):
    """Sliding-window and global layers get their own attention mask and RoPE: one argument set per type, and
    each layer run alone on its own reproduces the full model; with layer 0's a global layer goes wrong."""
    d, ref = family_demo("gemma3")
    adapter, model = ref.adapter, ref.load()
    rec = hooked(model, adapter, batch_of(d, model))
    layers = adapter.layers(model)
    hidden, args = capture_layer_inputs(model, layers, ragged.collate(load_samples(d / "inputs.safetensors")[0]),
                                        "cpu", torch.float32, adapter)
    assert args.of_layer == [0, 0, 0, 1] and len(args.sets) == 2 and not args.added
    sliding, full = args.sets
    assert not torch.equal(sliding["attention_mask"], full["attention_mask"])
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])
    for i, layer in enumerate(layers):
        assert torch.equal(layer_forward(layer, rec[i]["in"], args.kwargs(i)), rec[i]["out"])
    wrong = layer_forward(layers[3], rec[3]["in"], args.kwargs(0))
    assert (wrong - rec[3]["out"]).abs().max() > 1e-2


def test_gemma_inputs_carry_token_types_and_one_bos(family_demo):
    d, ref = family_demo("gemma3")
    samples, _ = load_samples(d / "inputs.safetensors")
    bos = ref.processor().tokenizer.bos_token_id
    for s in samples:
        assert torch.equal(s["token_type_ids"][0].bool(), s["vision_mask"][0].bool())  # image tokens attend both ways
        assert s["input_ids"][0, 0] == bos and (s["input_ids"][0] == bos).sum() == 1
    batch = ragged.collate(samples)  # per-token key: right-padded, not concatenated
    assert batch["token_type_ids"].shape == batch["input_ids"].shape


@torch.no_grad()
def test_zero_centred_and_head_shared_norms_fold_exactly(family_demo):
    """x̂·(1 + w) norms (Gemma 3, every Qwen3.5 norm) take w' = (1 + w)/s − 1; Qwen3.5's gated norm, one weight per
    head channel shared by the heads, takes scales repeating per head. Folding w/s instead is far off."""
    x, z = torch.randn(1, 7, 256), torch.randn(1, 7, 256)
    for family, prev, linears in (
            ("gemma3", "pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            ("qwen3_5", "input_layernorm", ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b",
                                            "linear_attn.in_proj_a")),
            ("qwen3_5", "linear_attn.norm", ("linear_attn.out_proj",))):
        layer = family_demo(family)[1].load_layers([0])[0]
        norm = layer.get_submodule(prev)
        norm.weight.uniform_(-0.3, 0.3)
        width = norm.weight.numel()
        s = (torch.rand(width, generator=torch.Generator().manual_seed(0)) * 3 + 0.25).repeat(256 // width)
        if family == "gemma3":
            run = lambda: layer.mlp(norm(x))  # noqa: E731
        elif prev == "input_layernorm":
            run = lambda: layer.linear_attn(norm(x), cache=None, attention_mask=None)  # noqa: E731
        else:  # per head: (x̂·w)·silu(z) over head_v_dim, then out_proj
            run = lambda: layer.linear_attn.out_proj(norm(x.view(-1, 64), z.view(-1, 64)).view(1, 7, 256))  # noqa: E731
        before = run()
        fold_scales(layer, [(prev, linears, s)])
        torch.testing.assert_close(run(), before, rtol=1e-4, atol=1e-5)
    norm = family_demo("qwen3_5")[1].load_layers([0])[0].input_layernorm
    norm.weight.uniform_(-0.3, 0.3)
    before = norm(x)
    norm.weight.div_(s)  # the plain-norm rule on a zero-centred norm
    assert (norm(x) * s - before).abs().max() > 0.1
