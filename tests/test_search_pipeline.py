"""Search stages on the demo model, called as library functions (no Snakemake)."""
import copy
import dataclasses

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmquant.data.calib import build_calib
from vlmquant.data.inputs import build_inputs
from vlmquant.errors import VlmquantError
from vlmquant.export.checkpoint import quantize_in_memory
from vlmquant.io import ragged
from vlmquant.io.scales import chunk_layer_files, load_cache, load_layer, merge
from vlmquant.models import get_adapter
from vlmquant.models.loading import load_layers, open_model
from vlmquant.quant.model import apply_scale_cache, quantized_activations
from vlmquant.search import pipeline as P
from vlmquant.models.capture import capture_layer_inputs, load_layer_inputs, load_samples, model_inputs, token_masks
from vlmquant.search.grads import gradient_stats
from vlmquant.search.grid import loss_tokens
from vlmquant.search.layer import search_layer, search_layer_in_order
from vlmquant.search.plan import SMOOTH_NORMS, plan_layer

from conftest import run_spec
from test_calib import coco_cfg

RUN = run_spec("mbq", method="mbq", w_bit=3, w_group=128)
NAMES = {"model": "demo", "calib": "demo", "run": "mbq"}
META = {**NAMES, "run_config": RUN.search_params()}


def meta_of(spec):
    return {**NAMES, "run": spec.name, "run_config": spec.search_params()}


@pytest.fixture(scope="module")
def staged(demo_data, demo_model_path, tmp_path_factory):
    """inputs, grads and boundary activations of every layer for a 4-sample calibration set."""
    d = tmp_path_factory.mktemp("search")
    model = open_model({"family": "qwen2_vl", "path": str(demo_model_path), "dtype": "float32"}, "cpu")
    build_calib(coco_cfg(demo_data, n_samples=4), d / "calib.parquet")
    build_inputs(d / "calib.parquet", model, d / "inputs.safetensors")
    P.run_grads(model, d / "inputs.safetensors", d / "grads.safetensors")
    P.run_acts(model, d / "inputs.safetensors", [0, 1, 2, 3], d / "acts")
    return d, model


def search_all(staged, out, per_job, spec=RUN):
    """Search the 4 layers in chunks of per_job (folders out/chunk_NNN); distort chunks start from what the
    previous chunk left in its folder."""
    d, model = staged
    folders = []
    for a in range(0, 4, per_job):
        start = folders[-1] if spec.distort and a else d / "acts"
        folders.append(out / f"chunk_{a:03d}")
        P.run_search(model, spec, d / "inputs.safetensors", start, d / "grads.safetensors" if spec.needs_grads else None,
                     list(range(a, min(a + per_job, 4))), folders[-1], {**NAMES, "run": spec.name})
    merge(chunk_layer_files(folders), out / "cache.pt", out / "search.parquet", meta_of(spec))
    return out / "cache.pt"


def acts(staged, layer):
    return staged[0] / "acts" / f"layer_{layer:03d}.safetensors"


@pytest.fixture(scope="module")
def merged(staged, tmp_path_factory):
    return search_all(staged, tmp_path_factory.mktemp("all"), per_job=4)


def test_chunking_does_not_change_the_cache(staged, merged, tmp_path):
    assert search_all(staged, tmp_path, per_job=1).read_bytes() == merged.read_bytes()
    assert sorted(p.name for p in (tmp_path / "chunk_002").iterdir()) == ["layer_002.safetensors"]


def test_cache_format_and_search_never_loses_to_rtn(merged):
    cache = load_cache(merged)  # weights_only=True
    assert len(cache["scale"]) == 4 * 4  # 4 layers x 4 groups (MHA: v_proj → o_proj applies)
    prev, linears, s = cache["scale"][0]
    assert prev == "layers.0.input_layernorm"
    assert linears == ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj")
    assert s.dtype == torch.float32 and s.shape == (256,) and (s > 0).all()
    table = pd.read_parquet(merged.parent / "search.parquet")
    assert len(table) == 16
    assert (table["loss"] <= table["rtn_loss"]).all()
    assert (table["alpha"] > 0).any()  # the search found something better than RTN somewhere
    assert (table.loc[table["alpha"] > 0, "loss"] < table.loc[table["alpha"] > 0, "rtn_loss"]).all()


def logits_change_when_applied(staged, cache):
    """Max relative change of the fp model's logits on the calibration set once `cache` is folded in."""
    d, ref = staged
    adapter = ref.adapter
    model = ref.load()
    samples, _ = load_samples(d / "inputs.safetensors")
    batch = model_inputs(ragged.collate(samples), "cpu", torch.float32)
    with torch.no_grad():
        before = model(**batch).logits
        apply_scale_cache(model, adapter, load_cache(cache))
        after = model(**batch).logits
    return ((after - before).abs().max() / before.abs().max()).item()


def test_applied_scales_leave_fp_logits_unchanged(staged, merged):
    assert logits_change_when_applied(staged, merged) <= 1e-3
    assert any(not torch.allclose(s, torch.ones_like(s)) for _, _, s in load_cache(merged)["scale"])


def test_gradient_stats_equal_direct_autograd(staged):
    d, ref = staged
    adapter = ref.adapter
    model = ref.load()
    samples, _ = load_samples(d / "inputs.safetensors")
    one = samples[:1]
    stats, counts = gradient_stats(model, adapter, one, "cpu", torch.float32, batch_size=1)

    # direct: the model's own loss with labels = caption tokens, retain_grad on the outputs
    model = ref.load()
    batch = ragged.collate(one)
    outs = {}

    def keep(key):
        def hook(module, args, output):
            output.retain_grad()
            outs[key] = output
        return hook

    for i, layer in enumerate(adapter.layers(model)):
        for site, name in (("attn", "self_attn.o_proj"), ("mlp", "mlp.down_proj")):
            layer.get_submodule(name).register_forward_hook(keep((site, i)))
    loss = model(**model_inputs(batch, "cpu", torch.float32), labels=batch["labels"]).loss
    loss.backward()
    vis, cap = batch["vision_mask"][0].bool(), batch["caption_mask"][0].bool()
    for (site, i), o in outs.items():
        g = o.grad[0].abs()
        torch.testing.assert_close(stats[site]["vis"][i], g[vis].mean(), rtol=1e-4, atol=0)
        torch.testing.assert_close(stats[site]["cap"][i], g[cap].mean(), rtol=1e-4, atol=0)
    assert counts == {"vis": int(vis.sum()), "cap": int(cap.sum())}


def test_reweight_ratios_recorded(staged):
    d, _ = staged
    g = load_file(d / "grads.safetensors")
    for site in ("attn", "mlp"):
        r = g[f"{site}.vis"] / g[f"{site}.cap"]
        torch.testing.assert_close(g[f"{site}.ratio"], torch.maximum(r, r.quantile(0.5)))


def test_w_group_must_divide_widths(staged, tmp_path):
    d, model = staged
    with pytest.raises(VlmquantError, match=r"decoder layer 0 self_attn.q_proj: weight of shape \(256, 256\) cannot"):
        P.run_search(model, run_spec("mbq", method="mbq", w_bit=3, w_group=100), d / "inputs.safetensors", d / "acts",
                     d / "grads.safetensors", [0], tmp_path / "out", NAMES)
    assert not (tmp_path / "out").exists()


def test_non_finite_activations_name_the_layer(staged, tmp_path):
    d, model = staged
    t = load_file(acts(staged, 2))
    t["hidden"][0, 3, 5] = float("nan")
    from safetensors import safe_open
    with safe_open(acts(staged, 2), "pt") as f:
        meta = f.metadata()
    (tmp_path / "bad").mkdir()
    save_file(t, tmp_path / "bad/layer_002.safetensors", metadata=meta)
    with pytest.raises(VlmquantError, match="decoder layer 2"):
        P.run_search(model, RUN, d / "inputs.safetensors", tmp_path / "bad", d / "grads.safetensors",
                     [2], tmp_path / "out", NAMES)
    assert not (tmp_path / "out").exists()


def test_merge_refuses_files_of_another_run(staged, merged, tmp_path):
    layer_files = chunk_layer_files([merged.parent / "chunk_000"])
    with pytest.raises(VlmquantError, match="layer_000.safetensors: scale file is for run='mbq', expected 'other'"):
        merge(layer_files, tmp_path / "c.pt", tmp_path / "t.parquet", dict(META, run="other"))
    with pytest.raises(VlmquantError, match="expected layer 0"):
        merge(layer_files[1:], tmp_path / "c.pt", tmp_path / "t.parquet", META)
    assert not (tmp_path / "c.pt").exists()


def test_awq_needs_no_grads(staged, tmp_path):
    cache = search_all(staged, tmp_path, per_job=2, spec=run_spec("awq", method="awq", w_bit=3))
    table = pd.read_parquet(cache.parent / "search.parquet")
    assert table["ratio"].isna().all() and (table["loss"] <= table["rtn_loss"]).all()


@pytest.mark.parametrize("smooth", [None, "all"], ids=["norms", "all"])
def test_smoothquant_run_through_the_search_jobs(staged, tmp_path, smooth):
    """SmoothQuant: no grads, scales from maxima (not a grid point), fp logits unchanged once applied. By default
    only the norm-fed groups are smoothed, and folding the cache changes only their norms' and linears' weights
    (no bias, no o_proj or down_proj); `smooth: all` adds v_proj → o_proj and up_proj → down_proj."""
    spec = run_spec("sq", method="smoothquant", w_bit=8, a_bit=8, **({"smooth": smooth} if smooth else {}))
    assert spec.alpha == 0.5 and spec.smooth == (smooth or "norms")
    cache = search_all(staged, tmp_path, per_job=2, spec=spec)
    table = pd.read_parquet(cache.parent / "search.parquet")
    skipped, table = table[table["alpha"].isna()], table[table["alpha"].notna()]  # skipped groups: a row, no α
    assert len(skipped) == (0 if smooth else 8) and (skipped["note"] == f"skipped: {SMOOTH_NORMS}").all()
    assert (table["alpha"] == 0.5).all() and table["ratio"].isna().all()
    assert (table["loss"] != table["rtn_loss"]).all()  # the smoothed candidate is kept, whatever its loss
    assert logits_change_when_applied(staged, cache) <= 1e-3
    norms = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
    groups = [(prev.split(".", 2)[2], tuple(n.split(".", 2)[2] for n in lins))
              for prev, lins, _ in load_cache(cache)["scale"]]
    if smooth == "all":
        assert len(groups) == 16 and {p for p, _ in groups} == {*norms, "self_attn.v_proj", "mlp.up_proj"}
        return
    assert groups == list(norms.items()) * 4
    model = staged[1].load()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_scale_cache(model, staged[1].adapter, load_cache(cache))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    want = {f"model.language_model.layers.{i}.{n}.weight" for i in range(4) for p, lins in norms.items()
            for n in (p, *lins)}
    assert changed == want


@pytest.mark.parametrize("ratios", [None, {"attn": 2.0, "mlp": 1.5}], ids=["awq", "mbq"])
def test_token_wise_blocks_run_on_the_loss_tokens_only(staged, ratios):
    """MLP, o_proj and down_proj see only the tokens the loss reads (no padding; with a ratio only caption
    and vision tokens), with the same losses and α as running them on every token."""
    d, ref = staged
    adapter = ref.adapter
    layer = ref.load_layers([1])[1]
    hidden, args, _ = load_layer_inputs(acts(staged, 1), "cpu", torch.float32)
    kwargs = args.kwargs(1)
    masks = token_masks(ragged.collate(load_samples(d / "inputs.safetensors")[0]))
    n_keep = int(loss_tokens(masks, ratios is not None).sum())
    assert 0 < n_keep < masks["valid"].numel()
    run = RUN if ratios else run_spec("awq", method="awq", w_bit=3)
    plan = plan_layer(run, layer, 1, adapter)
    assert [g.token_wise for g in plan.groups] == [False, True, True, True]
    rows = []
    hook = layer.mlp.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    selected, _ = search_layer(layer, plan, hidden, kwargs, masks, run, ratios)
    hook.remove()
    assert rows == [masks["valid"].numel()] + [n_keep] * RUN.n_grid  # the fp capture, then the grid
    every_token = dataclasses.replace(plan, groups=[dataclasses.replace(g, token_wise=False) for g in plan.groups])
    whole, _ = search_layer(layer, every_token, hidden, kwargs, masks, run, ratios)
    assert [r.alpha for r in selected] == [r.alpha for r in whole]
    for a, b in zip(selected, whole):
        torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=0)
        torch.testing.assert_close(a.scales, b.scales, rtol=0, atol=0)


DISTORT = run_spec("distort", method="mbq", w_bit=3, distort=True)  # true: the reference's definition
DISTORT_LAYER = run_spec("distort", method="mbq", w_bit=3, distort="layer")


def w4a8_distort(ignore=(), distort="reference"):
    return run_spec("distort", ignore, method="mbq", w_bit=4, a_bit=8, n_grid=10, distort=distort)


def layer_inputs_of_quantized_model(staged, spec, cache, layer):
    """Inputs of decoder layer `layer` in the model as export and eval quantize it."""
    d, ref = staged
    adapter = ref.adapter
    model = ref.load()
    ignored = quantize_in_memory(model, adapter, spec, load_cache(cache))["ignored"]
    layers = adapter.layers(model)
    samples, _ = load_samples(d / "inputs.safetensors")
    with torch.no_grad(), quantized_activations(model, adapter, spec.scheme, ignored):
        hidden, args = capture_layer_inputs(model, layers, ragged.collate(samples), "cpu", torch.float32, adapter)
        for i in range(layer):
            hidden = args.forward(layers[i], i, hidden)
    return hidden


@pytest.mark.parametrize("run", [DISTORT, DISTORT_LAYER, w4a8_distort(), w4a8_distort(distort="layer"),
                                 w4a8_distort(("mlp", "layers.0.self_attn.q_proj"))],
                         ids=["w3g128", "w3g128-layer", "w4a8", "w4a8-layer", "w4a8-ignore"])
def test_distort_searches_each_layer_on_the_quantized_model_inputs(staged, merged, tmp_path, run):
    cache = search_all(staged, tmp_path, per_job=2, spec=run)
    last = sorted(p.name for p in (tmp_path / "chunk_002").iterdir())
    assert last == ["layer_002.safetensors", "layer_003.safetensors"]  # the last chunk leaves no next inputs
    got, _, info = load_layer_inputs(tmp_path / "chunk_000" / "next_inputs.safetensors", "cpu", torch.float32)
    assert info["layer"] == 2 and info["run"] == "distort"
    torch.testing.assert_close(got, layer_inputs_of_quantized_model(staged, run, cache, 2))
    fp_chain = tmp_path / "chunk_000" / "next_fp_inputs.safetensors"
    if run.distort == "reference":  # the fp model's inputs of layer 2 beside them
        fp_got, _, fp_info = load_layer_inputs(fp_chain, "cpu", torch.float32)
        assert fp_info == info and torch.equal(fp_got, load_layer_inputs(acts(staged, 2), "cpu", torch.float32)[0])
    else:
        assert not fp_chain.exists()
    if run.ignore:  # the linears export leaves fp change what the next layers see
        plain = tmp_path / "no_ignore"
        search_all(staged, plain, per_job=2, spec=w4a8_distort())
        next_inputs = plain / "chunk_000" / "next_inputs.safetensors"
        assert not torch.equal(got, load_layer_inputs(next_inputs, "cpu", torch.float32)[0])
    if run in (DISTORT, DISTORT_LAYER):  # same run as `merged` but for distort
        table, fp = pd.read_parquet(cache.parent / "search.parquet"), pd.read_parquet(merged.parent / "search.parquet")
        # layer: layer 0 is searched on the same inputs, later ones not; reference: only layer 0's first group
        first_group = table.groupby("layer").cumcount() == 0
        same = (table.layer == 0) & (first_group | (run is DISTORT_LAYER))
        assert table[same].equals(fp[same])
        assert not (table.loc[~same, "rtn_loss"] == fp.loc[~same, "rtn_loss"]).any()
        assert (table["loss"] <= table["rtn_loss"]).all()
    if run in (DISTORT, DISTORT_LAYER, w4a8_distort()):  # resumed chunk by chunk, independent of layers_per_job
        assert search_all(staged, tmp_path / "one_per_job", per_job=1, spec=run).read_bytes() == cache.read_bytes()
        assert search_all(staged, tmp_path / "one_job", per_job=4, spec=run).read_bytes() == cache.read_bytes()


# the demo's (Qwen2) scale groups: prev, linears, block
QWEN2_GROUPS = [("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
                ("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
                ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
                ("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj")]


def block_call(layer, block, hidden, kwargs, quantize_act=None):
    """(args, kwargs, output) of `block` in one forward of `layer` on `hidden`; quantize_act: every linear's input
    goes through it (hooks registered after the capture's)."""
    seen = {}
    hooks = [layer.get_submodule(block).register_forward_pre_hook(
        lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True),
        layer.get_submodule(block).register_forward_hook(lambda m, a, out: seen.update(out=out))]
    if quantize_act:
        hooks += [m.register_forward_pre_hook(lambda m, a: (quantize_act(a[0]),)) for m in layer.modules()
                  if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        layer(hidden, **kwargs)
    for h in hooks:
        h.remove()
    out = seen["out"]
    return seen["args"], seen["kwargs"], out[0] if isinstance(out, tuple) else out


def reference_losses(layer, h_fp, h_q, kwargs, masks, spec, ratios, found, n_grid):
    """The MBQ reference's `distort` losses of each group, written out: target = the fp block on the fp chain;
    the block's input x as the layer computes it from the quantized chain with the groups before it folded
    (`found`, in order) and (from the second group on) every linear's weights and inputs quantized; candidate
    s = a^α normalized, a = mean |x| (valid tokens), block(x / s) with the group's linears' weights Q(W·s) and
    inputs Q_a (the block's other linears fp)."""
    from vlmquant.quant.quantizer import quantizer
    from vlmquant.search.grid import group_loss

    q = quantizer(spec.scheme)
    out = []
    for gi, (prev, linears, block) in enumerate(QWEN2_GROUPS):
        target = block_call(layer, block, h_fp, kwargs)[2]
        quantized = copy.deepcopy(layer)
        with torch.no_grad():
            for (p, lins, _), s in zip(QWEN2_GROUPS[:gi], found):
                op = quantized.get_submodule(p)
                if isinstance(op, torch.nn.Linear):  # its last len(s) output rows, bias too
                    op.weight[-len(s):] /= s[:, None]
                    if op.bias is not None:
                        op.bias[-len(s):] /= s
                else:
                    op.weight /= s
                for n in lins:
                    quantized.get_submodule(n).weight.mul_(s)
            if gi:
                for m in quantized.modules():
                    if isinstance(m, torch.nn.Linear):
                        m.weight.copy_(q.weight(m.weight))
        args, kw, _ = block_call(quantized, block, h_q, kwargs, q.act if gi and q.act else None)
        key = "hidden_states" if "hidden_states" in kw else None
        x = kw[key] if key else args[0]
        a = x.reshape(-1, x.shape[-1])[masks["valid"].reshape(-1)].abs().mean(0)
        losses = []
        for i in range(n_grid):
            s = a.pow(i / n_grid).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            cand = copy.deepcopy(layer.get_submodule(block))
            lins = [cand if n == block else cand.get_submodule(n.removeprefix(block + ".")) for n in linears]
            with torch.no_grad():
                for lin in lins:
                    lin.weight.copy_(q.weight(lin.weight * s))
            hooks = [m.register_forward_pre_hook(lambda m, a_: (q.act(a_[0]),)) for m in lins] if q.act else []
            with torch.no_grad():
                o = cand(*args, **{**kw, key: x / s}) if key else cand(x / s, *args[1:], **kw)
            for h in hooks:
                h.remove()
            losses.append(group_loss(target, o[0] if isinstance(o, tuple) else o, masks, spec.loss,
                                     ratios["attn" if gi < 2 else "mlp"]))
        out.append(losses)
    return out


@pytest.mark.parametrize("run", [DISTORT, w4a8_distort()], ids=["w3g128", "w4a8"])
def test_distort_reference_losses_match_a_direct_implementation(staged, tmp_path, run):
    """Layer 1 of a reference distort run (chunks of one layer): every group's losses, given the scales of the
    groups before it, are those of the definition written out (reference_losses), and the best is kept."""
    d, ref = staged
    search_all(staged, tmp_path, per_job=1, spec=run)
    t, _ = load_layer(tmp_path / "chunk_001" / "layer_001.safetensors")
    h_fp, args, _ = load_layer_inputs(acts(staged, 1), "cpu", torch.float32)
    h_q = load_layer_inputs(tmp_path / "chunk_000" / "next_inputs.safetensors", "cpu", torch.float32)[0]
    assert not torch.equal(h_fp, h_q)
    masks = token_masks(ragged.collate(load_samples(d / "inputs.safetensors")[0]))
    ratios = {site: float(r[1]) for site, r in P.load_ratios(d / "grads.safetensors").items()}
    layer = ref.load_layers([1])[1]
    found = [t[f"scale.{k}"] for k in range(4)]
    want = torch.tensor(reference_losses(layer, h_fp, h_q, args.kwargs(1), masks, run, ratios, found, run.n_grid))
    torch.testing.assert_close(t["losses"], want, rtol=1e-4, atol=1e-7)
    assert t["best"].tolist() == want.argmin(1).tolist()


def test_reference_distort_in_micro_batches_picks_the_same_alpha(staged):
    """search_layer_in_order one sample (and two samples) at a time: the same α, losses and fp output as all at
    once, and the layer's weights left as loaded."""
    d, ref = staged
    h_fp, args, _ = load_layer_inputs(acts(staged, 1), "cpu", torch.float32)
    h_q = h_fp + 0.05 * torch.randn(h_fp.shape, generator=torch.Generator().manual_seed(0))
    masks = token_masks(ragged.collate(load_samples(d / "inputs.safetensors")[0]))
    run, ratios = w4a8_distort(), {"attn": 2.0, "mlp": 1.5}
    out = []
    for per_batch in (None, 1, 2):
        layer = ref.load_layers([1])[1]
        loaded = {k: v.clone() for k, v in layer.state_dict().items()}
        plan = plan_layer(run, layer, 1, ref.adapter)
        out.append(search_layer_in_order(layer, plan, h_q, h_fp, args.kwargs(1), masks, run, ratios, ref.adapter,
                                         per_batch))
        assert all(torch.equal(v, loaded[k]) for k, v in layer.state_dict().items())
    (whole, fp_whole), *parts = out
    assert len(whole) == 4 and len({r.alpha for r in whole}) > 1
    for results, fp_out in parts:
        assert [r.alpha for r in results] == [r.alpha for r in whole]
        for a, b in zip(results, whole):
            torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=0)
        torch.testing.assert_close(fp_out, fp_whole)


def test_distort_chunks_refuse_fp_or_other_runs_inputs(staged, tmp_path):
    d, model = staged
    with pytest.raises(VlmquantError, match="acts/next_inputs.safetensors: not a decoder-layer inputs file"):
        P.run_search(model, DISTORT, d / "inputs.safetensors", d / "acts", d / "grads.safetensors", [2, 3],
                     tmp_path / "out", {**NAMES, "run": "distort"})
    first = tmp_path / "chunk_000"
    P.run_search(model, DISTORT, d / "inputs.safetensors", d / "acts", d / "grads.safetensors", [0, 1], first,
                 {**NAMES, "run": "distort"})
    with pytest.raises(VlmquantError, match="holds another run's layer inputs; distort run 'other'"):
        P.run_search(model, DISTORT, d / "inputs.safetensors", first, d / "grads.safetensors", [2, 3],
                     tmp_path / "out", {**NAMES, "run": "other"})
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("run", [RUN, DISTORT], ids=["fp-inputs", "distort"])
def test_gpu_path_picks_the_same_alpha_as_cpu(staged, tmp_path, run):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    d, model = staged
    cpu_cache = search_all(staged, tmp_path / "cpu", per_job=4, spec=run)
    gpu = open_model({"family": "qwen2_vl", "path": model.path, "dtype": "float32"}, "cuda")
    P.run_grads(gpu, d / "inputs.safetensors", tmp_path / "grads.safetensors")
    P.run_acts(gpu, d / "inputs.safetensors", [0], tmp_path / "acts")
    P.run_search(gpu, run, d / "inputs.safetensors", tmp_path / "acts", tmp_path / "grads.safetensors",
                 [0, 1, 2, 3], tmp_path / "chunk", {**NAMES, "run": run.name})
    merge(chunk_layer_files([tmp_path / "chunk"]), tmp_path / "cache.pt", tmp_path / "search.parquet", meta_of(run))
    cpu = pd.read_parquet(cpu_cache.parent / "search.parquet")
    gpu = pd.read_parquet(tmp_path / "search.parquet")
    assert gpu["alpha"].tolist() == cpu["alpha"].tolist()
    # distort: each layer's input is the previous layer's quantized output, where a code that rounds the other way
    # on the GPU changes the next layer's losses by up to about 0.2 % (measured on one H200)
    rtol = 5e-3 if run.distort else 1e-3
    torch.testing.assert_close(torch.tensor(gpu["loss"].values), torch.tensor(cpu["loss"].values), rtol=rtol, atol=0)


def test_lean_forwards_match_the_model(demo_model_path):
    from vlmquant.search.lean import SiluMul, lean_forwards, lean_mlp_forward

    g = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluMul.apply, (g, u))
    model = get_adapter("qwen2_vl").load_model(demo_model_path)
    mlp = model.model.language_model.layers[0].mlp
    lean = lean_mlp_forward(mlp)
    assert lean is not None  # the demo's SiLU MLP takes the lean path
    x = torch.randn(3, 256)
    torch.testing.assert_close(lean(x), mlp(x))
    layers = model.model.language_model.layers
    x = torch.randn(2, 5, 256, requires_grad=True)
    mlp_in = lambda: layers[0].mlp(layers[0].post_attention_layernorm(x))  # noqa: E731
    ref = mlp_in()
    ref_grad, = torch.autograd.grad(ref.square().sum(), x)
    with lean_forwards(layers, "mlp") as n:
        assert n == 3 * len(layers)  # each layer's MLP and both RMSNorms take the lean path
        out = mlp_in()
        grad, = torch.autograd.grad(out.square().sum(), x)
    assert all("forward" not in vars(m) for m in layers.modules())  # originals restored
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_text_only_calibration_runs_mbq_on_the_caption_tokens(demo_data, demo_model_path, tmp_path):
    """format: text rows have no vision token: the inputs carry no pixels, every layer's vision gradient and so
    its ratio ρ is 0, and MBQ's search (loss on caption tokens alone) still never loses to RTN."""
    model = open_model({"family": "qwen2_vl", "path": str(demo_model_path), "dtype": "float32"}, "cpu")
    build_calib(coco_cfg(demo_data, n_samples=4, format="text"), tmp_path / "calib.parquet")
    build_inputs(tmp_path / "calib.parquet", model, tmp_path / "inputs.safetensors")
    samples, _ = load_samples(tmp_path / "inputs.safetensors")
    assert all("pixel_values" not in x and not x["vision_mask"].any() and x["caption_mask"].any() for x in samples)
    P.run_grads(model, tmp_path / "inputs.safetensors", tmp_path / "grads.safetensors")
    g = load_file(tmp_path / "grads.safetensors")
    for site in ("attn", "mlp"):
        assert (g[f"{site}.vis"] == 0).all() and (g[f"{site}.cap"] > 0).all() and (g[f"{site}.ratio"] == 0).all()
    P.run_acts(model, tmp_path / "inputs.safetensors", [0], tmp_path / "acts")
    P.run_search(model, RUN, tmp_path / "inputs.safetensors", tmp_path / "acts", tmp_path / "grads.safetensors",
                 [0, 1, 2, 3], tmp_path / "chunk_000", NAMES)
    merge(chunk_layer_files([tmp_path / "chunk_000"]), tmp_path / "cache.pt", tmp_path / "search.parquet", META)
    table = pd.read_parquet(tmp_path / "search.parquet")
    assert len(table) == 16 and (table["ratio"] == 0).all() and table["loss"].notna().all()
    assert (table["loss"] <= table["rtn_loss"]).all() and (table["alpha"] > 0).any()
