"""Mixture-of-experts layers (Qwen3-VL-MoE, Qwen3.5-MoE): fused 3-D experts quantized per expert in one op, the
batched per-expert search against the straightforward per-expert loop, experts without tokens, folds into
routers and experts, checkpoint layouts, and what the exports do with experts."""
import dataclasses
import json
import shutil
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from vlmquant.errors import VlmquantError
from vlmquant.io.scales import load_cache, merge, save_layer
from vlmquant.models import get_adapter
from vlmquant.models.base import in_width, layer_part
from vlmquant.models.capture import load_layer_inputs, load_samples, token_masks
from vlmquant.quant.fake import scaled_fake_quant
from vlmquant.quant.quantizer import quantizer
from vlmquant.quant.scheme import Scheme
from vlmquant.quant.fold import fold_scales
from vlmquant.quant.model import (decoder_experts, decoder_linears, expert_modules, pseudo_quantize,
                                  quantized_activations, quantized_inputs)
from vlmquant.search import experts as X
from vlmquant.search import pipeline as P
from vlmquant.search.grid import group_loss, grid_scales, loss_tokens
from vlmquant.search.layer import quantized_forward, search_layer
from vlmquant.search.plan import plan_layer
from vlmquant.io import ragged

from conftest import open_demo, run_spec

SCHEMES = (Scheme(3, 128), Scheme(4, 128, True), Scheme(4, -1, True), Scheme(8, -1, True, "float", 8, "float"))


def experts_module(n_experts=8, hidden=256, width=128, seed=0):
    """Qwen3-VL-MoE fused experts with random weights: gate_up_proj (E, 2I, H), down_proj (E, H, I)."""
    config = transformers.Qwen3VLMoeTextConfig(hidden_size=hidden, moe_intermediate_size=width, num_experts=n_experts,
                                               num_experts_per_tok=2)
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    experts = transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe.Qwen3VLMoeTextExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.05)
        experts.down_proj.normal_(0, 0.05)
    return experts


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_fused_experts_fake_quantize_per_expert_in_one_op(scheme):
    w = experts_module().down_proj.detach()  # (E, H, I)
    assert torch.equal(quantizer(scheme).weight(w), torch.stack([quantizer(scheme).weight(w[e]) for e in range(w.shape[0])]))
    s = torch.rand(w.shape[0], 1, w.shape[2]) + 0.5  # per expert
    assert torch.equal(scaled_fake_quant(w, s, 3, 128), torch.stack([scaled_fake_quant(w[e], s[e, 0], 3, 128)
                                                                     for e in range(w.shape[0])]))


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "loop"])
def test_expert_linear_equals_a_linear_per_expert(grouped, monkeypatch):
    monkeypatch.setattr(X, "grouped_mm_runs", lambda x: grouped)
    w = experts_module().gate_up_proj.detach()
    counts = torch.tensor([5, 0, 3, 0, 0, 9, 1, 2])  # empty experts too
    x = torch.randn(int(counts.sum()), 256)
    offs = counts.cumsum(0).to(torch.int32)
    want = torch.cat([F.linear(part, w[e]) for e, part in enumerate(x.split(counts.tolist()))])
    assert torch.equal(X.expert_linear(x, w, offs), want)


def routed_inputs(experts, n_tokens=300, seed=1, unused=(0,)):
    """Hidden states with uneven channels, top-2 routing that never picks the `unused` experts, and masks: padding at
    the end, caption and vision tokens."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, 256, generator=g) * (torch.rand(256, generator=g) * 4)
    logits = torch.randn(n_tokens, experts.num_experts, generator=g)
    logits[:, list(unused)] = -1e9
    top_k_index = logits.topk(2, dim=-1).indices
    idx = torch.arange(n_tokens)
    masks = {"valid": idx < n_tokens - 20, "vis": (idx >= 30) & (idx < 150), "cap": (idx >= 200) & (idx < 260)}
    return hidden, top_k_index, masks


@torch.no_grad()
def straightforward_best(experts, hidden, top_k_index, masks, scheme, n_grid, loss, ratio):
    """The reference: for each expert, its routed tokens, for each α its quantized down_proj (and with a_bit its
    input quantized per token as the scaled model sees it, act(h/s)·s) and group_loss; the index of the α each
    expert keeps."""
    act = quantizer(scheme).act
    keep = loss_tokens(masks, ratio is not None)
    out = []
    for e in range(experts.num_experts):
        tok = (top_k_index == e).any(-1) & masks["valid"]
        if not (tok & keep).any():
            out.append(0)
            continue
        gate, up = F.linear(hidden[tok], experts.gate_up_proj[e]).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        k = keep[tok]
        fp = F.linear(h[k], experts.down_proj[e])
        sub = {m: v[tok][k] for m, v in masks.items()}
        losses = []
        for s in grid_scales(h.abs().mean(0), n_grid):
            w = quantizer(scheme).weight(experts.down_proj[e] * s) / s
            x = h[k] if act is None else act(h[k] / s) * s
            losses.append(group_loss(fp, F.linear(x, w), sub, loss, ratio))
        out.append(min(range(n_grid), key=losses.__getitem__))
    return out


@pytest.mark.parametrize("loss,ratio", [("mae", None), ("mae", 2.0), ("mse", 1.5)], ids=["awq", "mbq", "mbq-mse"])
def test_batched_expert_search_picks_the_alpha_of_the_per_expert_loop(loss, ratio):
    """Every expert gets the α the loop over experts picks; expert 0, which no token is routed to, keeps α = 0
    with scales of 1, and the search table says so."""
    experts = experts_module()
    hidden, top_k_index, masks = routed_inputs(experts)
    scheme = Scheme(3, 128)
    job = X.experts_job(experts, hidden, top_k_index, masks, ratio)
    result = X.search_experts(job, run_spec("t", method="mbq", w_bit=3, n_grid=10, loss=loss))
    assert result.best.tolist() == straightforward_best(experts, hidden, top_k_index, masks, scheme, 10, loss, ratio)
    assert torch.equal(result.alpha, result.best / 10)
    assert result.tokens[0] == 0 and result.alpha[0] == 0 and torch.equal(result.scales[0], torch.ones(128))
    assert (result.tokens[1:] > 0).all() and (result.alpha[1:] > 0).any()
    assert (result.losses.gather(1, result.best[:, None]) <= result.losses[:, :1]).all()


@pytest.mark.parametrize("cfg", [dict(w_bit=4, a_bit=8), dict(w_bit=8, a_bit=8, w_type="float")],
                         ids=["w4a8", "fp8"])
def test_weight_activation_expert_search_quantizes_each_experts_routed_tokens(cfg):
    """With a_bit, every expert picks the α of the per-expert loop whose down_proj input is quantized per token on
    its routed tokens, and those losses are not the weight-only ones."""
    experts = experts_module()
    hidden, top_k_index, masks = routed_inputs(experts)
    spec = run_spec("t", method="mbq", n_grid=10, **cfg)
    job = X.experts_job(experts, hidden, top_k_index, masks, 2.0)
    result = X.search_experts(job, spec)
    assert result.best.tolist() == straightforward_best(experts, hidden, top_k_index, masks, spec.scheme, 10, "mae", 2.0)
    weights_only = SimpleNamespace(scheme=dataclasses.replace(spec.scheme, a_bit=None), n_grid=10, loss="mae")
    weight_only = X.search_experts(job, weights_only)
    assert not torch.equal(result.losses, weight_only.losses)
    assert (result.tokens[1:] > 0).all() and (result.alpha[1:] > 0).any()


def textbook_moe(experts, hidden, top_k_index, top_k_weights, bits):
    """A W·A8 MoE block token by token: each token's input quantized per token (abs-max / 127, round, clamp), then for
    each of its experts gate/up, act(gate)·up quantized per token the same way, down, times the routing weight."""
    def q(v):
        scale = v.abs().max().clamp(min=1e-5) / (2 ** (bits - 1) - 1)
        return (v / scale).round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale

    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        x = q(hidden[t])
        for j, e in enumerate(top_k_index[t].tolist()):
            gate, up = (experts.gate_up_proj[e] @ x).chunk(2)
            out[t] += top_k_weights[t, j] * (experts.down_proj[e] @ q(experts.act_fn(gate) * up))
    return out


@torch.no_grad()
def test_fused_experts_quantize_both_inputs_per_token_at_run_time():
    """quantized_inputs over a fused experts module: its forward is the textbook W·A8 MoE (every routed token's gate/up
    input and down input quantized per token); a weight-only scheme and leaving the block give transformers' own."""
    experts = experts_module()
    hidden, top_k_index, _ = routed_inputs(experts, n_tokens=40)
    top_k_weights = torch.rand(top_k_index.shape).softmax(-1)
    fp = experts(hidden, top_k_index, top_k_weights)
    with quantized_inputs([], Scheme(4, -1, True, a_bit=8), [experts]) as n:
        out = experts(hidden, top_k_index, top_k_weights)
    assert n == 1 and "forward" not in experts.__dict__
    torch.testing.assert_close(out, textbook_moe(experts, hidden, top_k_index, top_k_weights, 8), rtol=1e-5, atol=1e-6)
    assert (out - fp).abs().max() > 1e-4
    with quantized_inputs([], Scheme(4, 128), [experts]) as n:
        assert n == 0 and torch.equal(experts(hidden, top_k_index, top_k_weights), fp)
    assert torch.equal(experts(hidden, top_k_index, top_k_weights), fp)


def test_an_expert_without_calibration_tokens_is_a_row_of_the_search_table(tmp_path):
    experts = experts_module()
    hidden, top_k_index, masks = routed_inputs(experts, unused=(0, 5))
    result = X.search_experts(X.experts_job(experts, hidden, top_k_index, masks),
                              run_spec("t", method="awq", w_bit=3, n_grid=4))
    group = get_adapter("qwen3_vl_moe").groups["moe"][1]
    meta = {"model": "m", "run": "r"}
    save_layer(tmp_path / "layer_000.safetensors", 0, [group], [result], [None], meta)
    merge([tmp_path / "layer_000.safetensors"], tmp_path / "c.pt", tmp_path / "t.parquet", meta)
    table = pd.read_parquet(tmp_path / "t.parquet")
    assert table["expert"].tolist() == list(range(8)) and table["tokens"].tolist() == result.tokens.tolist()
    unused = table[table.tokens == 0]
    assert unused.expert.tolist() == [0, 5] and (unused.alpha == 0).all()
    assert (unused.note == "no calibration token routed: α = 0 (RTN)").all() and table.note.isna().sum() == 6
    (prev, linears, s), = load_cache(tmp_path / "c.pt")["scale"]
    assert prev == "layers.0.mlp.experts.gate_up_proj" and linears == ("layers.0.mlp.experts.down_proj",)
    assert s.shape == (8, 128) and torch.equal(s, result.scales)


@torch.no_grad()
def test_moe_layer_search_equals_the_straightforward_expert_loop(family_demo, monkeypatch, tmp_path):
    """A Qwen3-VL-MoE layer: the MoE block's group through transformers' grouped_mm experts and the per-expert
    groups through one grouped matmul per grid point pick the α of transformers' eager loop over experts with
    a loop of per-expert matmuls."""
    d, ref = family_demo("qwen3_vl_moe")
    P.run_acts(ref, d / "inputs.safetensors", [0], tmp_path)
    hidden, args, _ = load_layer_inputs(tmp_path / "layer_000.safetensors", "cpu", torch.float32)
    masks = token_masks(ragged.collate(load_samples(d / "inputs.safetensors")[0]))
    run, ratios = run_spec("mbq", method="mbq", w_bit=3, n_grid=4), {"attn": 1.5, "mlp": 2.0}
    layer = ref.load_layers([0])[0]
    plan = plan_layer(run, layer, 0, ref.adapter)
    plan = dataclasses.replace(plan, groups=plan.groups[2:], searches=plan.searches[2:], periods=plan.periods[2:])
    fast, _ = search_layer(layer, plan, hidden, args.kwargs(0), masks, run, ratios)
    monkeypatch.setattr(layer.mlp.experts.config, "_experts_implementation", "eager")  # the config is shared
    monkeypatch.setattr(X, "grouped_mm_runs", lambda x: False)
    loop, _ = search_layer(layer, plan, hidden, args.kwargs(0), masks, run, ratios)
    assert fast[0].alpha == loop[0].alpha and fast[1].alpha.tolist() == loop[1].alpha.tolist()
    torch.testing.assert_close(torch.tensor(fast[0].losses), torch.tensor(loop[0].losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(fast[1].losses, loop[1].losses, rtol=1e-5, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_random_scales_fold_into_routers_and_experts_exactly(family_demo, family):
    """Scales in [1/4, 4] folded into every group of a MoE layer (norm → router, experts' gate/up, shared expert;
    per expert up → down; shared expert up → down) leave its output unchanged; the router is scaled, not left."""
    ref = family_demo(family)[1]
    layer = ref.load_layers([0])[0]
    x = torch.randn(2, 9, 256)
    run = (lambda: layer.mlp(layer.post_attention_layernorm(x)))  # noqa: E731
    before, router = run(), layer.mlp.gate.weight.clone()
    g = torch.Generator().manual_seed(0)
    entries = []
    for grp in ref.adapter.resolve_groups(layer, 0)[2:]:
        w = layer_part(layer, grp.linears[0])
        shape = (w.shape[0], w.shape[2]) if grp.experts else (in_width(w),)
        entries.append((grp.prev, grp.consumers, torch.exp(torch.empty(shape).uniform_(-1.4, 1.4, generator=g))))
    fold_scales(layer, entries)
    torch.testing.assert_close(run(), before, rtol=1e-4, atol=1e-5)
    assert not torch.equal(layer.mlp.gate.weight, router)
    with pytest.raises(VlmquantError, match="are per expert, but post_attention_layernorm is not a fused experts"):
        fold_scales(layer, [("post_attention_layernorm", ("mlp.gate",), torch.ones(8, 256))])


def rewrite(src, dst, fn):
    """A copy of model folder `src` whose tensors are fn(dict of tensors)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(fn(load_file(src / "model.safetensors")), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def transposed(t):
    return {k: v.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else v
            for k, v in t.items()}


def per_expert(t):
    out = {}
    for k, v in t.items():
        base, _, leaf = k.rpartition(".")
        if leaf == "gate_up_proj":
            for e, w in enumerate(v):
                out[f"{base}.{e}.gate_proj.weight"], out[f"{base}.{e}.up_proj.weight"] = w.chunk(2)
        elif leaf == "down_proj" and base.endswith("experts"):
            out.update({f"{base}.{e}.down_proj.weight": w for e, w in enumerate(v)})
        else:
            out[k] = v
    return out


def fused(t):
    out, n = {}, {}
    for k, v in sorted(t.items()):
        parts = k.split(".")
        if "experts" in parts and parts[-1] == "weight":
            i = parts.index("experts")
            base, e, proj = ".".join(parts[:i + 1]), int(parts[i + 1]), parts[i + 2]
            n.setdefault(base, {}).setdefault(e, {})[proj] = v
        else:
            out[k] = v
    for base, experts in n.items():
        out[f"{base}.gate_up_proj"] = torch.stack([torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]])
                                                   for e in sorted(experts)])
        out[f"{base}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in sorted(experts)])
    return out


def test_lazy_loader_reads_the_checkpoint_layouts_from_pretrained_reads(family_demo, tmp_path):
    """Qwen3-VL-MoE: fused (what transformers saves) and transposed (the releases); one tensor per expert is
    refused, as transformers would leave those experts random. Qwen3.5-MoE: per expert (what transformers 5.24
    saves) and fused (the release)."""
    for family, layouts, refused in (("qwen3_vl_moe", (transposed,), per_expert), ("qwen3_5_moe", (fused,), None)):
        d, ref = family_demo(family)
        want = ref.load_layers(range(4))
        cls = getattr(transformers, ref.adapter.model_class)
        for layout in layouts:
            folder = rewrite(d / "model", tmp_path / f"{family}-{layout.__name__}", layout)
            got = open_demo(folder, family).load_layers(range(4))
            from_pretrained = ref.adapter.layers(cls.from_pretrained(folder))
            for i in range(4):
                for k, v in want[i].state_dict().items():
                    assert torch.equal(got[i].state_dict()[k], v) and torch.equal(from_pretrained[i].state_dict()[k], v)
        if refused:
            folder = rewrite(d / "model", tmp_path / f"{family}-refused", refused)
            with pytest.raises(VlmquantError, match=r"layers\.0\.mlp\.experts holds one tensor per expert \(.*experts\.0\."
                                                    r"gate_proj\.weight\), a layout transformers does not load"):
                open_demo(folder, family).load_layers([0])


@torch.no_grad()
def test_weight_activation_runs_search_and_quantize_moe_layers(family_demo, tmp_path):
    """A W4A8 MBQ run on a Qwen3-VL-MoE layer: the plan takes it, the MoE block's group sees the experts' input
    quantized per token (its losses are not the weight-only run's), every expert is searched on its routed tokens,
    and the distorted layer output quantizes the experts' inputs at run time."""
    d, ref = family_demo("qwen3_vl_moe")
    P.run_acts(ref, d / "inputs.safetensors", [0], tmp_path)
    hidden, args, _ = load_layer_inputs(tmp_path / "layer_000.safetensors", "cpu", torch.float32)
    masks = token_masks(ragged.collate(load_samples(d / "inputs.safetensors")[0]))
    ratios = {"attn": 1.5, "mlp": 2.0}
    results = {}
    for name, cfg in {"w4a8": dict(a_bit=8), "w4": {}}.items():
        spec = run_spec(name, method="mbq", w_bit=4, n_grid=4, **cfg)
        layer = ref.load_layers([0])[0]
        plan = plan_layer(spec, layer, 0, ref.adapter)
        plan = dataclasses.replace(plan, groups=plan.groups[2:], searches=plan.searches[2:], periods=plan.periods[2:])
        results[name], fp_out = search_layer(layer, plan, hidden, args.kwargs(0), masks, spec, ratios)
        assert [g.prev for g in plan.groups] == ["post_attention_layernorm", "mlp.experts.gate_up_proj"]
        calls = []
        layer.mlp.experts.register_forward_hook(lambda m, a, o: calls.append("forward" in m.__dict__))
        out = quantized_forward(layer, 0, plan.groups, results[name], spec, hidden, args.kwargs(0), ref.adapter)
        assert calls == [bool(cfg)] and not torch.equal(out, fp_out)
    (norm_a8, experts_a8), (norm_w, experts_w) = results["w4a8"], results["w4"]
    assert norm_a8.losses != norm_w.losses and norm_a8.losses[0] > norm_w.losses[0]
    assert experts_a8.scales.shape == (8, 384) and (experts_a8.tokens > 0).all()
    assert not torch.equal(experts_a8.losses, experts_w.losses)


@torch.no_grad()
def test_weight_activation_pseudo_model_quantizes_expert_inputs_at_run_time(family_demo):
    """pseudo_quantize takes a W8A8 run on a MoE model; quantized_activations hooks every quantized linear and swaps
    every fused experts module's forward (restored on exit), and changes the logits."""
    ref = family_demo("qwen3_vl_moe")[1]
    model, spec = ref.load(), run_spec("w8a8", method="rtn", w_bit=8, a_bit=8)
    pseudo_quantize(model, ref.adapter, spec)
    ids = torch.tensor([[5, 17, 300, 42, 9, 77, 123, 4]])
    plain = model(input_ids=ids).logits
    with quantized_activations(model, ref.adapter, spec.scheme) as n:
        quantized = model(input_ids=ids).logits
        assert all("forward" in m.__dict__ for m in expert_modules(model.model.language_model.layers[0], ref.adapter))
    assert n == len(decoder_linears(model, ref.adapter)) + 3  # three MoE layers, one dense
    assert not torch.equal(plain, quantized) and torch.equal(model(input_ids=ids).logits, plain)


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_packed_export_packs_experts_per_expert(family_demo, family, tmp_path):
    """compressed-tensors export of an RTN W4 run: linears packed, every fused expert weight packed one module per
    expert and projection (tests/test_moe_packed.py compares them with the pseudo checkpoint), routers' gates and
    Qwen3.5's b/a projections never quantized (listed in ignore)."""
    pytest.importorskip("compressed_tensors")
    from vlmquant.export.packed import write_packed
    from vlmquant.quant.model import decoder_linears

    ref = family_demo(family)[1]
    adapter, model = ref.adapter, ref.load()
    experts = [n for n, _ in decoder_experts(model, adapter)]
    record = write_packed(model, adapter, [n for n, _ in decoder_linears(model, adapter)], Scheme(4, 128),
                          tmp_path / "packed")
    assert record["packed_experts"] == experts
    assert len(experts) == 2 * (3 if family == "qwen3_vl_moe" else 4)  # layer 3 of one is dense
    ignore = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]["ignore"]
    assert not any(n.endswith(adapter.keep_fp) for n in record["quantized_modules"])
    assert all(f"model.language_model.layers.0.{n}" in ignore for n in (*adapter.keep_fp, "mlp.gate"))
    stored = load_file(tmp_path / "packed" / "model.safetensors")
    assert not [k for k in stored if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    width, hidden = model.config.text_config.moe_intermediate_size, model.config.text_config.hidden_size
    for e in range(8):
        for proj, shape in (("gate_proj", [width, hidden]), ("up_proj", [width, hidden]),
                            ("down_proj", [hidden, width])):
            assert stored[f"model.language_model.layers.0.mlp.experts.{e}.{proj}.weight_shape"].tolist() == shape


def test_qwen3_5_linear_attention_projections_are_fused_for_serving():
    pytest.importorskip("compressed_tensors")
    from vlmquant.export.packed import check_fused

    names = ["layers.0.linear_attn.in_proj_qkv", "layers.0.linear_attn.in_proj_z", "layers.0.linear_attn.out_proj"]
    with pytest.raises(VlmquantError, match="in_proj_z ignored but layers.0.linear_attn.in_proj_qkv quantized"):
        check_fused(names, [names[0], names[2]])
    check_fused(names, [names[2]])
@torch.no_grad()
def test_the_shared_expert_is_searched_and_quantized_like_a_dense_mlp(family_demo, tmp_path):
    """Qwen3.5-MoE, an AWQ W4A8 search (layer 0 checked): the shared expert's gate/up share the norm's group with the experts
    and its up → down is a group of its own with searched scales; the pseudo checkpoint holds its down_proj as
    Q(W·s) with those scales and its gate/up quantized; the packed one stores all three packed, equal to pseudo."""
    pytest.importorskip("compressed_tensors")
    from vlmquant.export.checkpoint import export_checkpoint
    from vlmquant.export.packed import export_packed
    from test_moe_packed import decompressed, tensors

    d, ref = family_demo("qwen3_5_moe")
    spec, names = run_spec("awq-w4a8", method="awq", w_bit=4, a_bit=8, n_grid=4), {"model": "m", "calib": "c", "run": "r"}
    P.run_acts(ref, d / "inputs.safetensors", [0], tmp_path / "acts")
    P.run_search(ref, spec, d / "inputs.safetensors", tmp_path / "acts", None, [0, 1, 2, 3], tmp_path / "chunk", names)
    merge(sorted((tmp_path / "chunk").glob("layer_*.safetensors")), tmp_path / "cache.pt", tmp_path / "t.parquet",
          {**names, "run_config": spec.search_params()})
    table = pd.read_parquet(tmp_path / "t.parquet").query("layer == 0")
    norm = table[table.group == "post_attention_layernorm"]
    assert norm.linears.tolist() == ["mlp.experts.gate_up_proj,mlp.shared_expert.gate_proj,mlp.shared_expert.up_proj,"
                                     "mlp.gate,mlp.shared_expert_gate"]  # the last two scaled, never quantized
    shared = table[table.group == "mlp.shared_expert.up_proj"]
    assert shared.linears.tolist() == ["mlp.shared_expert.down_proj"] and shared.expert.isna().all()
    s = dict((p, t) for p, _, t in load_cache(tmp_path / "cache.pt")["scale"])["layers.0.mlp.shared_expert.up_proj"]
    assert s.shape == (256,) and not torch.equal(s, torch.ones(256))
    export_checkpoint(ref, spec, tmp_path / "pseudo", tmp_path / "cache.pt")
    export_packed(ref, spec, tmp_path / "packed", tmp_path / "cache.pt")
    fp, pseudo = tensors(d / "model"), tensors(tmp_path / "pseudo")
    base = "model.language_model.layers.0.mlp.shared_expert."
    weight = quantizer(spec.scheme).weight
    assert torch.equal(pseudo[base + "down_proj.weight"], weight(fp[base + "down_proj.weight"] * s))
    for proj in ("gate_proj", "up_proj"):
        w = pseudo[base + proj + ".weight"]
        assert torch.equal(weight(w), w) and not torch.equal(w, fp[base + proj + ".weight"])
    packed = tensors(tmp_path / "packed")
    unpacked = decompressed(tmp_path / "packed")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert base + proj + ".weight_scale" in packed and base + proj + ".weight" not in packed
        assert torch.equal(unpacked[base + proj + ".weight"], pseudo[base + proj + ".weight"])


def test_weight_activation_moe_eval_streamed_equals_resident(family_demo, tmp_path):
    """An RTN W4A8 Qwen3-VL-MoE checkpoint evaluated with its decoder layers streamed (eval.run.streamed_batches)
    and resident (quant.model.quantized_activations): the same tables, both quantizing the experts' inputs (the
    weight-only eval of the same weights differs)."""
    from vlmquant.eval.run import run_eval, run_fp_reference
    from vlmquant.export.checkpoint import export_checkpoint

    d, model = family_demo("qwen3_vl_moe")
    inputs, names = d / "inputs.safetensors", {"model": "demo", "calib": "demo", "run": "w4a8"}
    settings = {"batch_size": 2, "kl_top_k": 0, "hidden_positions": 8}
    spec = run_spec("w4a8", method="rtn", w_bit=4, a_bit=8)
    export_checkpoint(model, spec, tmp_path / "checkpoint", None, names=names)
    run_fp_reference(model, inputs, tmp_path / "fp.safetensors", tmp_path / "fp.parquet", settings, {"model": "demo"})
    tables = {}
    for mode in ("never", "always"):
        out = tmp_path / f"{mode}.parquet"
        run_eval(dataclasses.replace(model, stream=mode), tmp_path / "checkpoint", inputs, tmp_path / "fp.safetensors",
                 out, settings, names)
        tables[mode] = pd.read_parquet(out)
    pd.testing.assert_frame_equal(tables["never"], tables["always"], rtol=1e-5)
    info = tmp_path / "checkpoint" / "quantization.json"
    info.write_text(info.read_text().replace('"a_bit": 8', '"a_bit": null'))  # the same weights, weight-only
    run_eval(model, tmp_path / "checkpoint", inputs, tmp_path / "fp.safetensors", tmp_path / "w.parquet", settings,
             names)
    kl = {k: t.query("metric == 'kl'")["value"].to_numpy() for k, t in
          {**tables, "weights": pd.read_parquet(tmp_path / "w.parquet")}.items()}
    assert (kl["never"] != kl["weights"]).all() and (kl["never"] > 0).all()


def test_distort_w4a8_moe_inputs_are_those_of_the_exported_model_at_eval(family_demo, tmp_path):
    """A distort MBQ W4A8 run on Qwen3-VL-MoE in chunks of two layers: the inputs the first chunk hands to layer 2 are
    those of the model as export quantizes it (scales folded, experts fake-quantized per expert) run with activations
    quantized at run time (experts' inputs included), as eval runs it."""
    from vlmquant.export.checkpoint import quantize_in_memory
    from vlmquant.io.scales import chunk_layer_files
    from vlmquant.models.capture import capture_layer_inputs

    d, ref = family_demo("qwen3_vl_moe")
    spec = run_spec("distort", method="mbq", w_bit=4, a_bit=8, n_grid=4, distort=True)
    names = {"model": "m", "calib": "c", "run": "distort"}
    P.run_grads(ref, d / "inputs.safetensors", tmp_path / "grads.safetensors")
    P.run_acts(ref, d / "inputs.safetensors", [0, 2], tmp_path / "acts")
    chunks = [tmp_path / "chunk_000", tmp_path / "chunk_002"]
    for first, start, out in ((0, tmp_path / "acts", chunks[0]), (2, chunks[0], chunks[1])):
        P.run_search(ref, spec, d / "inputs.safetensors", start, tmp_path / "grads.safetensors", [first, first + 1],
                     out, names)
    merge(chunk_layer_files(chunks), tmp_path / "cache.pt", tmp_path / "t.parquet",
          {**names, "run_config": spec.search_params()})
    got = load_layer_inputs(chunks[0] / "next_inputs.safetensors", "cpu", torch.float32)[0]
    model = ref.load()
    quantize_in_memory(model, ref.adapter, spec, load_cache(tmp_path / "cache.pt"))
    layers = ref.adapter.layers(model)
    samples, _ = load_samples(d / "inputs.safetensors")
    with torch.no_grad(), quantized_activations(model, ref.adapter, spec.scheme):
        hidden, args = capture_layer_inputs(model, layers, ragged.collate(samples), "cpu", torch.float32, ref.adapter)
        for i in range(2):
            hidden = args.forward(layers[i], i, hidden)
    torch.testing.assert_close(got, hidden)
    fp = load_layer_inputs(P.layer_file(tmp_path / "acts", 2), "cpu", torch.float32)[0]
    assert not torch.allclose(got, fp)
