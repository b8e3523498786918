"""What makes Qwen3-VL, Qwen3.5 and Gemma 3 different (issue 14), each on its tiny demo model: scale groups by
layer kind, groups skipped with a reason, deepstack replayed wherever layers run alone, per-layer-type
arguments, zero-centred and head-shared norm folds, Gemma's inputs. Mixture of experts: test_moe.py."""
import pandas as pd
import pytest
import torch
import transformers

from vlmquant.export.checkpoint import quantize_in_memory
from vlmquant.io import ragged
from vlmquant.io.scales import chunk_layer_files, load_cache, merge, save_layer
from vlmquant.models import get_adapter
from vlmquant.models.loading import meta_model
from vlmquant.quant.fold import fold_scales
from vlmquant.search import pipeline as P
from vlmquant.models.capture import capture_layer_inputs, layer_forward, load_layer_inputs, load_samples, model_inputs
from vlmquant.search.grid import GroupResult

from conftest import run_spec

NAMES = {"model": "demo", "calib": "demo", "run": "distort"}


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
               {**NAMES, "skipped": adapter.skipped_groups(layer, 0)})
    merge([tmp_path / "layer_000.safetensors"], tmp_path / "c.pt", tmp_path / "t.parquet", NAMES)
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
                         NAMES)
        caches[per_job] = tmp_path / f"{per_job}.pt"
        merge(chunk_layer_files(folders), caches[per_job], tmp_path / f"{per_job}.parquet",
              {**NAMES, "run_config": run.search_params()})
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
