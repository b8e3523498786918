"""Eval on the demo workflow's outputs: the fp reference, the eval tables, and run_eval on its checkpoints
(the metric math: tests/test_metrics.py)."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import transformers

from conftest import open_demo, run_spec
from e2e_pipeline import CALIB, EVAL_CALIB, MODEL, RUNS
from vlmquant import paths
from vlmquant.errors import VlmquantError
from vlmquant.eval.run import load_reference, run_eval, run_fp_reference
from vlmquant.eval.table import SCHEMA, read_table
from vlmquant.io.scales import load_cache
from vlmquant.models import get_adapter
from vlmquant.quant.model import apply_scale_cache, decoder_linears
from vlmquant.models.capture import load_samples, model_inputs

ADAPTER = get_adapter("qwen2_vl")
pytestmark = pytest.mark.slow
SETTINGS = {"batch_size": 4, "kl_top_k": 0, "hidden_positions": 16}  # the demo config's eval settings


@pytest.fixture(scope="module")
def model(pipe):
    return open_demo(pipe.model_dir)


def table(pipe, run):
    path = (pipe.fp_ref.with_suffix(".parquet") if run == "fp" else pipe.run_dir(run) / "eval.parquet")
    return read_table(path)


def value(df, metric, layer=None, modality=None):
    rows = df[(df.metric == metric) & (df.layer.isna() if layer is None else df.layer == layer)]
    if modality is not None:
        rows = rows[rows.modality == modality]
    assert len(rows) == 1, (metric, layer, modality)
    return float(rows.value.iloc[0])


# ---- the fp reference ----------------------------------------------------------------------


def test_fp_reference_caption_nll_matches_transformers_loss(pipe):
    """Independent check of caption positions and label shifting: HF's own loss, sample by sample."""
    df, meta = table(pipe, "fp")
    model = ADAPTER.load_model(pipe.model_dir)
    samples, _ = load_samples(pipe.eval_inputs)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            n = int((s["labels"][0, 1:] != -100).sum())
            out = model(**model_inputs(s, "cpu", torch.float32), labels=s["labels"])
            total, count = total + float(out.loss) * n, count + n
    assert value(df, "n_caption_tokens") == count and value(df, "n_samples") == len(samples) == 6
    assert value(df, "caption_nll", modality="caption") == pytest.approx(total / count, rel=1e-5)
    assert value(df, "caption_ppl", modality="caption") == pytest.approx(math.exp(total / count), rel=1e-5)
    assert meta["method"] == "fp" and meta["dtype"] == "float32"


def test_fp_reference_contents(pipe):
    ref, meta = load_reference(pipe.fp_ref)
    n = ref["cap.target"].numel()
    vocab = meta["vocab"]
    assert ref["cap.topk_idx"].shape == (n, vocab)  # kl_top_k 0: the whole vocabulary
    assert torch.allclose(ref["cap.topk_logp"].exp().sum(1), torch.ones(n), atol=1e-4)
    m = ref["hid.pos"].numel()
    assert all(ref[f"hid.layer_{i:03d}"].shape == (m, 256) for i in range(4))
    # 6 samples, up to 16 vision and 16 text positions each
    assert 0 < int(ref["hid.vision"].sum()) <= 6 * 16 and 0 < int((~ref["hid.vision"]).sum()) <= 6 * 16
    assert meta["settings"] == SETTINGS and meta["n_layers"] == 4


def test_fp_model_evaluated_as_a_checkpoint_has_zero_error(pipe, model, tmp_path):
    """The eval path against its own fp reference: every error exactly 0, NLL equal to the fp row."""
    fake = tmp_path / "fp-checkpoint"
    shutil.copytree(pipe.model_dir, fake)
    (fake / "quantization.json").write_text(json.dumps({"method": "fp", "w_bit": 32, "w_group": -1}))
    out = tmp_path / "eval.parquet"
    ids = {"model": MODEL, "calib": CALIB, "run": "fp-copy", "eval_calib": EVAL_CALIB}
    run_eval(model, fake, pipe.eval_inputs, pipe.fp_ref, out, SETTINGS, ids)
    df, _ = read_table(out)
    fp, _ = table(pipe, "fp")
    assert value(df, "caption_nll", modality="caption") == pytest.approx(value(fp, "caption_nll", modality="caption"), rel=1e-9)
    assert value(df, "kl", modality="caption") == 0.0
    assert value(df, "top1_agreement", modality="caption") == 1.0
    errs = df[df.metric.isin(["hidden_rel_mse", "weight_rel_err", "weight_rel_err_scaled"])]
    assert len(errs) == 4 * 2 + 4 * 2 and (errs.value == 0).all()


def test_eval_refuses_mismatched_reference_and_incomplete_checkpoint(pipe, model, tmp_path):
    ids = {"model": MODEL, "calib": CALIB, "run": "mbq-w3g128", "eval_calib": EVAL_CALIB}
    ckpt = pipe.run_dir("mbq-w3g128") / "checkpoint"
    with pytest.raises(VlmquantError, match="eval.hidden_positions=16, this eval 8"):
        run_eval(model, ckpt, pipe.eval_inputs, pipe.fp_ref, tmp_path / "a.parquet",
                 {**SETTINGS, "hidden_positions": 8}, ids)
    other_inputs = pipe / paths.INPUTS.format(model=MODEL, calib=CALIB)
    with pytest.raises(VlmquantError, match="computed on other inputs"):
        run_eval(model, ckpt, other_inputs, pipe.fp_ref, tmp_path / "b.parquet", SETTINGS, ids)
    half = tmp_path / "half"
    shutil.copytree(ckpt, half)
    (half / "quantization.json").unlink()
    with pytest.raises(VlmquantError, match="not a complete vlmquant checkpoint"):
        run_eval(model, half, pipe.eval_inputs, pipe.fp_ref, tmp_path / "c.parquet", SETTINGS, ids)
    assert not any(p.suffix == ".parquet" for p in tmp_path.iterdir())


def test_topk_reference_gives_a_lower_bound_of_the_exact_kl(pipe, model, tmp_path):
    settings = {**SETTINGS, "kl_top_k": 50}
    ids = {"model": MODEL, "eval_calib": EVAL_CALIB}
    run_fp_reference(model, pipe.eval_inputs, tmp_path / "fp.safetensors", tmp_path / "fp.parquet", settings, ids)
    ref, _ = load_reference(tmp_path / "fp.safetensors")
    assert ref["cap.topk_idx"].shape[1] == 50
    run_eval(model, pipe.run_dir("rtn-w3g128") / "checkpoint", pipe.eval_inputs, tmp_path / "fp.safetensors",
             tmp_path / "eval.parquet", settings, {**ids, "calib": CALIB, "run": "rtn-w3g128"})
    coarse, _ = read_table(tmp_path / "eval.parquet")
    exact, _ = table(pipe, "rtn-w3g128")
    kl_c, kl_e = value(coarse, "kl", modality="caption"), value(exact, "kl", modality="caption")
    assert 0 < kl_c <= kl_e
    # everything else does not depend on k
    for metric in ("caption_nll", "top1_agreement"):
        assert value(coarse, metric, modality="caption") == pytest.approx(value(exact, metric, modality="caption"))


# ---- the workflow's eval tables ------------------------------------------------------------


@pytest.mark.parametrize("run", RUNS)
def test_eval_table_layout(pipe, run):
    df, meta = table(pipe, run)
    assert list(df.columns) == SCHEMA.names
    assert set(df.model) == {MODEL} and set(df.calib) == {CALIB} and set(df.run) == {run}
    assert set(df.eval_calib) == {EVAL_CALIB}
    hidden = df[df.metric == "hidden_rel_mse"]
    assert sorted(zip(hidden.layer, hidden.modality)) == [(i, m) for i in range(4) for m in ("text", "vision")]
    for metric in ("weight_rel_err", "weight_rel_err_scaled"):
        assert sorted(df[df.metric == metric].layer) == [0, 1, 2, 3]
    values = df.value.to_numpy()
    assert np.isfinite(values).all()
    errors = df[df.metric.isin(["hidden_rel_mse", "weight_rel_err", "weight_rel_err_scaled", "kl"])].value
    assert (errors > 0).all() and (errors < 1).all()
    nll = value(df, "caption_nll", modality="caption")
    assert value(df, "caption_ppl", modality="caption") == pytest.approx(math.exp(nll))
    assert 0 <= value(df, "top1_agreement", modality="caption") <= 1
    fp, _ = table(pipe, "fp")
    assert value(df, "n_caption_tokens") == value(fp, "n_caption_tokens")
    assert (meta["method"], meta["w_bit"], meta["w_group"]) == (run[:3], 3, 128)
    rtn = run == "rtn-w3g128"
    same = [value(df, "weight_rel_err", layer=i) == value(df, "weight_rel_err_scaled", layer=i) for i in range(4)]
    assert all(same) if rtn else not any(same)  # RTN has no scales: both bases coincide


@torch.no_grad()
def test_weight_error_matches_unfolding_with_reciprocal_scales(pipe):
    """Original-basis weight error, recomputed by folding 1/s into the loaded checkpoint."""
    df, _ = table(pipe, "mbq-w3g128")
    ckpt = transformers.Qwen2VLForConditionalGeneration.from_pretrained(pipe.run_dir("mbq-w3g128") / "checkpoint")
    cache = load_cache(pipe.run_dir("mbq-w3g128") / "scale_cache.pt")
    apply_scale_cache(ckpt, ADAPTER, {"scale": [(p, ls, 1.0 / s) for p, ls, s in cache["scale"]]})
    fp = dict(decoder_linears(ADAPTER.load_model(pipe.model_dir), ADAPTER))
    for i in range(4):
        num = den = 0.0
        for name, lin in decoder_linears(ckpt, ADAPTER):
            if name.startswith(f"layers.{i}."):
                w = fp[name].weight.double()
                num += float((lin.weight.double() - w).square().sum())
                den += float(w.square().sum())
        assert value(df, "weight_rel_err", layer=i) == pytest.approx(math.sqrt(num / den), rel=1e-4)


# ---- weight-activation runs --------------------------------------------------------------------


def test_weight_activation_run_exports_per_channel_weights_and_quantizes_inputs_at_eval(pipe, model, tmp_path):
    """W4A8 (RTN): symmetric per-output-channel weights in the checkpoint; eval quantizes linear inputs."""
    from vlmquant.export import export_checkpoint, read_quant_info

    adapter = get_adapter("qwen2_vl")
    ckpt = tmp_path / "w4a8"
    export_checkpoint(model, run_spec("rtn-w4a8", method="rtn", w_bit=4, a_bit=8), ckpt,
                      names={"model": MODEL, "calib": CALIB, "run": "rtn-w4a8"})
    assert read_quant_info(ckpt)["a_bit"] == 8
    for _, lin in decoder_linears(adapter.load_model(ckpt), adapter):
        q = lin.weight / (lin.weight.abs().amax(1, keepdim=True) / 7)  # 4 bits symmetric: integers in [-7, 7]
        torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-3)
    ids = {"model": MODEL, "calib": CALIB, "run": "rtn-w4a8", "eval_calib": EVAL_CALIB}
    run_eval(model, ckpt, pipe.eval_inputs, pipe.fp_ref, tmp_path / "wa.parquet", SETTINGS, ids)
    info = json.loads((ckpt / "quantization.json").read_text())
    weight_only = {**info, "a_bit": None, "scheme": {**info["scheme"], "a_bit": None}}  # the same weights, fp activations
    (ckpt / "quantization.json").write_text(json.dumps(weight_only))
    run_eval(model, ckpt, pipe.eval_inputs, pipe.fp_ref, tmp_path / "w.parquet", SETTINGS, ids)
    (wa, meta), (w, _) = read_table(tmp_path / "wa.parquet"), read_table(tmp_path / "w.parquet")
    assert meta["a_bit"] == 8
    kl_wa, kl_w = value(wa, "kl", modality="caption"), value(w, "kl", modality="caption")
    assert kl_w > 0 and kl_wa > 0 and kl_wa != kl_w
    assert value(wa, "weight_rel_err", layer=0) == value(w, "weight_rel_err", layer=0)
