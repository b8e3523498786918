"""Export: pseudo-quantized HF checkpoints from the demo workflow's scale caches."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from e2e_pipeline import CALIB, MODEL
from vlmquant.data.calib import read_calib
from vlmquant.errors import VlmquantError
from vlmquant.export import export_checkpoint, read_quant_info
from vlmquant.export.checkpoint import shard_files
from vlmquant.io import ragged
from vlmquant.io.provenance import sha256_file
from vlmquant.io.scales import load_cache
from vlmquant.models import get_adapter
from vlmquant.models.loading import Checkpoint
from vlmquant.quant.fold import fold_scales
from vlmquant.quant.model import apply_scale_cache, decoder_linears, pseudo_quantize
from vlmquant.models.capture import load_samples, model_inputs

from conftest import open_demo, run_spec
from vlmquant import paths

pytestmark = pytest.mark.slow
ADAPTER = get_adapter("qwen2_vl")
RUN = run_spec("mbq-w3g128", method="mbq", w_bit=3, w_group=128)
RTN = run_spec("rtn-w3g128", method="rtn", w_bit=3, w_group=128)
NAMES = {"model": MODEL, "calib": CALIB, "run": "mbq-w3g128"}
LAYER_PREFIX = "model.layers."  # how the demo (transformers-saved Qwen2-VL) checkpoints name decoder layers


@pytest.fixture(scope="module")
def model(pipe):
    return open_demo(pipe.model_dir)


def cache_of(pipe, run="mbq-w3g128"):
    return pipe.run_dir(run) / "scale_cache.pt"


def tensors(folder):
    """Every tensor of a checkpoint folder, by name."""
    ckpt = Checkpoint(folder)
    out = {}
    for file in sorted(set(ckpt.files.values())):
        out.update(load_file(Path(folder) / file))
    return out


def fp_model(pipe):
    return ADAPTER.load_model(pipe.model_dir)


def in_memory(pipe, run):
    """The fp model pseudo-quantized in memory, without the export code path."""
    model = fp_model(pipe)
    if run != "rtn-w3g128":
        apply_scale_cache(model, ADAPTER, load_cache(cache_of(pipe, run)))
    pseudo_quantize(model, ADAPTER, RTN)
    return model


def eval_batch(pipe, n=2):
    samples, _ = load_samples(pipe.eval_inputs)
    return model_inputs(ragged.collate(samples[:n]), "cpu", torch.float32)


# ---- the workflow's checkpoints ------------------------------------------------------------


@pytest.mark.parametrize("run", ["rtn-w3g128", "awq-w3g128", "mbq-w3g128"])
def test_checkpoint_loads_and_equals_in_memory_quantization(pipe, run):
    folder = pipe.run_dir(run) / "checkpoint"
    loaded = transformers.Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    ref = in_memory(pipe, run)
    ref_state, got_state = ref.state_dict(), loaded.state_dict()
    assert got_state.keys() == ref_state.keys()
    assert all(torch.equal(got_state[k], ref_state[k]) for k in ref_state)
    batch = eval_batch(pipe)  # two held-out samples with their images, right-padded
    with torch.no_grad():
        got, want = loaded(**batch).logits, ref(**batch).logits
        fp = fp_model(pipe)(**batch).logits
    assert torch.equal(got, want)
    assert not torch.allclose(got, fp, atol=1e-3)  # it really is quantized


def test_checkpoint_generates_and_ships_the_processor(pipe):
    folder = pipe.run_dir("mbq-w3g128") / "checkpoint"
    processor = ADAPTER.load_processor(folder)
    source = ADAPTER.load_processor(pipe.model_dir)
    config = transformers.AutoConfig.from_pretrained(folder)
    row = read_calib(pipe / paths.CALIB.format(calib=CALIB))[0]
    enc = ADAPTER.encode(processor, config, row)
    assert torch.equal(enc["input_ids"], ADAPTER.encode(source, config, row)["input_ids"])
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    ref = in_memory(pipe, "mbq-w3g128")
    prompt = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert torch.equal(out, ref.generate(**prompt, max_new_tokens=6, do_sample=False))
    gen = transformers.GenerationConfig.from_pretrained(folder)
    assert gen.eos_token_id == config.text_config.eos_token_id


@pytest.mark.parametrize("run", ["rtn-w3g128", "mbq-w3g128"])
def test_every_weight_group_has_at_most_2_pow_bits_values(pipe, run):
    got = tensors(pipe.run_dir(run) / "checkpoint")
    fp = tensors(pipe.model_dir)
    names = [n for n, _ in decoder_linears(fp_model(pipe), ADAPTER)]
    assert len(names) == 4 * 7
    for name in names:
        key = LAYER_PREFIX + name.removeprefix("layers.") + ".weight"
        groups = got[key].reshape(got[key].shape[0], -1, 128).reshape(-1, 128)
        counts = torch.tensor([g.unique().numel() for g in groups])
        assert counts.max() <= 2**3, key
        fp_counts = torch.tensor([g.unique().numel() for g in fp[key].reshape(-1, 128)])
        assert fp_counts.min() > 2**3  # the property is not trivially true of the fp weights


@pytest.mark.parametrize("run", ["rtn-w3g128", "mbq-w3g128"])
def test_vision_tower_embeddings_lm_head_untouched(pipe, run):
    got = tensors(pipe.run_dir(run) / "checkpoint")
    fp = tensors(pipe.model_dir)
    assert got.keys() == fp.keys()
    outside = [k for k in fp if not k.startswith(LAYER_PREFIX)]
    assert any(k.startswith("visual.") for k in outside) and "lm_head.weight" in outside
    assert "model.embed_tokens.weight" in outside
    for k in outside:
        assert torch.equal(got[k], fp[k]), k
    changed = [k for k in fp if k.startswith(LAYER_PREFIX) and not torch.equal(got[k], fp[k])]
    linear_weights = {LAYER_PREFIX + n.removeprefix("layers.") + ".weight" for n, _ in decoder_linears(fp_model(pipe), ADAPTER)}
    if run == "rtn-w3g128":
        assert set(changed) == linear_weights  # RTN: only the linear weights; norms and biases unchanged
    else:
        assert linear_weights <= set(changed)  # scale folding also touches norms and v_proj biases


@pytest.mark.parametrize("run", ["rtn-w3g128", "mbq-w3g128"])
def test_quantization_metadata_in_json_and_shards(pipe, run):
    folder = pipe.run_dir(run) / "checkpoint"
    info = read_quant_info(folder)
    assert (info["method"], info["w_bit"], info["w_group"], info["run"], info["model"]) == (run[:3], 3, 128, run, MODEL)
    assert info["source_model"] == paths.DEMO_MODEL.format(family="qwen2_vl")
    if run == "rtn-w3g128":
        assert info["scale_cache_sha256"] is None and not (folder / "scales.safetensors").exists()
    else:
        assert info["scale_cache_sha256"] == sha256_file(cache_of(pipe, run))
    for shard in shard_files(folder):
        with safe_open(folder / shard, "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt"
        assert json.loads(meta["vlmquant"]) == info


def test_sharded_export_with_metadata_in_every_shard(pipe, model, tmp_path):
    out = tmp_path / "checkpoint"
    info = export_checkpoint(model, RUN, out, cache_of(pipe), max_shard_size="4MB", names=NAMES)
    shards = shard_files(out)
    assert len(shards) >= 4 and all((out / s).stat().st_size <= 5_000_000 for s in shards)
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            assert json.loads(f.metadata()["vlmquant"]) == info == read_quant_info(out)
    whole = tensors(pipe.run_dir("mbq-w3g128") / "checkpoint")
    split = tensors(out)
    assert split.keys() == whole.keys() and all(torch.equal(split[k], whole[k]) for k in whole)
    loaded = transformers.Qwen2VLForConditionalGeneration.from_pretrained(out)
    assert torch.equal(loaded.lm_head.weight, whole["lm_head.weight"])


# ---- export.ignore ---------------------------------------------------------------------------


def test_ignored_modules_stay_fp(pipe, model, tmp_path):
    out = tmp_path / "checkpoint"
    spec = run_spec("mbq-w3g128", ["mlp.down_proj", "layers.0.self_attn.q_proj"], method="mbq", w_bit=3)
    info = export_checkpoint(model, spec, out, cache_of(pipe))
    assert set(info["ignored_modules"]) == {f"layers.{i}.mlp.down_proj" for i in range(4)} | {"layers.0.self_attn.q_proj"}
    # up_proj → down_proj scales only serve down_proj: skipped when it is ignored
    assert info["skipped_scale_groups"] == [f"layers.{i}.mlp.up_proj" for i in range(4)]
    got, fp = tensors(out), tensors(pipe.model_dir)
    for i in range(4):
        key = f"{LAYER_PREFIX}{i}.mlp.down_proj.weight"
        assert torch.equal(got[key], fp[key]), key
    # q_proj shares input_layernorm's scales with the quantized k and v: scaled (fp function kept), not quantized
    cache = load_cache(cache_of(pipe))
    s = next(s for prev, _, s in cache["scale"] if prev == "layers.0.input_layernorm")
    q = f"{LAYER_PREFIX}0.self_attn.q_proj.weight"
    assert torch.equal(got[q], fp[q] * s)
    assert got[q][:, :128].unique().numel() > 8
    # the reference: the same filtered cache folded in memory, the rest quantized
    ref = fp_model(pipe)
    kept = [e for e in cache["scale"] if not e[0].endswith("mlp.up_proj")]
    fold_scales(ref.model.language_model, kept)
    pseudo_quantize(ref, ADAPTER, spec, exclude=info["ignored_modules"])
    up = ref.get_submodule("model.language_model.layers.2.mlp.up_proj").weight
    assert torch.equal(got[f"{LAYER_PREFIX}2.mlp.up_proj.weight"], up)
    batch = eval_batch(pipe)
    loaded = transformers.Qwen2VLForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, ref(**batch).logits)


# ---- bad input -----------------------------------------------------------------------------


def bad_caches(pipe):
    cache = load_cache(cache_of(pipe))
    entries = cache["scale"]
    renamed = [(p.replace("layers.3.", "layers.7."), tuple(n.replace("layers.3.", "layers.7.") for n in ls), s)
               for p, ls, s in entries]
    renamed_module = [(p, tuple(n.replace("up_proj", "upper_proj") for n in ls), s) for p, ls, s in entries]
    shorter = [(p, ls, s[:-1] if p.endswith("input_layernorm") else s) for p, ls, s in entries]
    dropped = [e for e in entries if not e[0].startswith("layers.3.")]
    return {
        "layer_name": ({**cache, "scale": renamed}, "layers.7.input_layernorm.* is not in this model.s 4 decoder layers"),
        "module_name": ({**cache, "scale": renamed_module}, "mlp.upper_proj.*does not exist"),
        "shape": ({**cache, "scale": shorter}, "input channels, the cache has 255 scales"),
        "layers": ({**cache, "scale": dropped}, r"covers decoder layers \[0, 1, 2\], the model has 4"),
        "model": ({**cache, "meta": {**cache["meta"], "model": "other-vlm"}}, "scale cache is for model 'other-vlm'"),
        "bits": ({**cache, "meta": {**cache["meta"], "run_config": {**cache["meta"]["run_config"], "w_bit": 4}}},
                 "searched with w_bit=4"),
    }


@pytest.mark.parametrize("case", ["layer_name", "module_name", "shape", "layers", "model", "bits"])
def test_mismatched_scale_cache_is_a_clear_error_and_leaves_nothing(pipe, model, tmp_path, case):
    cache, message = bad_caches(pipe)[case]
    path = tmp_path / "bad_cache.pt"
    torch.save(cache, path)
    out = tmp_path / "run" / "checkpoint"
    with pytest.raises(VlmquantError, match=message) as err:
        export_checkpoint(model, RUN, out, path, names={"model": MODEL})
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_method_and_cache_must_agree(pipe, model, tmp_path):
    with pytest.raises(VlmquantError, match="needs the run's scale cache"):
        export_checkpoint(model, RUN, tmp_path / "a", None)
    bare = tmp_path.parent / f"{tmp_path.name}_bare_cache.pt"  # no metadata: the method check itself must catch it
    torch.save({"scale": load_cache(cache_of(pipe))["scale"]}, bare)
    with pytest.raises(VlmquantError, match="rtn uses no scale cache"):
        export_checkpoint(model, RTN, tmp_path / "b", bare)
    with pytest.raises(VlmquantError, match="scale cache was searched with method='mbq', the run has method='rtn'"):
        export_checkpoint(model, RTN, tmp_path / "b", cache_of(pipe))
    with pytest.raises(VlmquantError, match="layers.0.self_attn.q_proj.*groups of 100"):
        export_checkpoint(model, run_spec("rtn", method="rtn", w_bit=3, w_group=100), tmp_path / "c")
    assert not any(tmp_path.iterdir())


KILL_SCRIPT = """
import os, signal, sys
import vlmquant.export.checkpoint as ck
real = ck.set_safetensors_metadata
def die_after_first_shard(path, extra):
    real(path, extra)
    os.kill(os.getpid(), signal.SIGKILL)  # like a job killed mid-write: no cleanup runs
ck.set_safetensors_metadata = die_after_first_shard
from vlmquant.models.loading import open_model
from vlmquant.spec import RunSpec
ck.export_checkpoint(open_model({"family": "qwen2_vl", "path": sys.argv[1]}, "cpu"),
                     RunSpec.from_config("rtn", {"method": "rtn", "w_bit": 3}), sys.argv[2], max_shard_size="4MB")
"""


def kill_mid_export(model_dir, out):
    res = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(model_dir), str(out)], capture_output=True, text=True)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]


def test_killed_export_never_leaves_a_complete_looking_folder(pipe, model, tmp_path):
    out = tmp_path / "rtn" / "checkpoint"
    kill_mid_export(pipe.model_dir, out)
    assert not out.exists()
    (partial,) = out.parent.glob(".checkpoint.*.tmp")
    assert any(partial.glob("model-*.safetensors")) and not (partial / "quantization.json").exists()
    with pytest.raises(VlmquantError, match="not a complete vlmquant checkpoint"):
        read_quant_info(partial)
    # the next export completes and clears the leftover
    export_checkpoint(model, RTN, out)
    assert read_quant_info(out)["method"] == "rtn"
    assert not partial.exists() and [p.name for p in out.parent.iterdir()] == ["checkpoint"]


# ---- compressed-tensors checkpoints and imported caches ---------------------------------------


@pytest.mark.parametrize("run", ["rtn-w3g128", "mbq-w3g128"])
def test_packed_checkpoint_equals_the_pseudo_one(pipe, run):
    """The workflow's compressed-tensors folder, loaded through transformers (dequantized on load), has
    exactly the pseudo checkpoint's weights and logits; it stores packed int32 codes and is smaller."""
    packed, pseudo = pipe.run_dir(run) / "packed", pipe.run_dir(run) / "checkpoint"
    config = json.loads((packed / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert "lm_head" in config["ignore"] and any(n.startswith("visual.") for n in config["ignore"])
    got, want = ADAPTER.load_model(packed), ADAPTER.load_model(pseudo)
    got_state, want_state = got.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys() and all(torch.equal(got_state[k], want_state[k]) for k in want_state)
    batch = eval_batch(pipe)
    with torch.no_grad():
        assert torch.equal(got(**batch).logits, want(**batch).logits)
    stored = tensors(packed)
    assert stored[f"{LAYER_PREFIX}0.mlp.down_proj.weight_packed"].dtype == torch.int32
    size = lambda folder: sum(p.stat().st_size for p in folder.glob("*.safetensors"))  # noqa: E731
    assert size(packed) < 0.8 * size(pseudo)
    assert read_quant_info(packed)["scale_cache_sha256"] == read_quant_info(pseudo)["scale_cache_sha256"]


def test_imported_cache_gives_the_same_checkpoint(pipe, model, tmp_path):
    """A run naming the MBQ run's cache (here in the reference's form: names under the model's decoder
    prefix, no metadata) exports exactly the checkpoint of the run that searched it."""
    from vlmquant.search.pipeline import run_import

    searched = load_cache(cache_of(pipe))
    reference = {"scale": [("model.language_model." + p, tuple("model.language_model." + n for n in ls), s)
                           for p, ls, s in searched["scale"]]}
    src = tmp_path / "mbq_reference.pt"
    torch.save(reference, src)
    spec = run_spec("imported", method="mbq", w_bit=3, scale_cache=str(src))
    assert spec.has_scales and not spec.searches and not spec.needs_grads
    names = {"model": MODEL, "calib": CALIB, "run": "imported"}
    run_import(model, spec, src, tmp_path / "cache.pt", names)
    imported = load_cache(tmp_path / "cache.pt")
    assert [(p, ls) for p, ls, _ in imported["scale"]] == [(p, tuple(ls)) for p, ls, _ in searched["scale"]]
    export_checkpoint(model, spec, tmp_path / "checkpoint", tmp_path / "cache.pt", names=names)
    got, want = tensors(tmp_path / "checkpoint"), tensors(pipe.run_dir("mbq-w3g128") / "checkpoint")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("edit, message", [
    (lambda c: {**c, "clip": [("layers.0.mlp.down_proj", torch.ones(1))]}, "weight-clipping entries"),
    (lambda c: {"scale": [("vision.blocks.0.norm1", *c["scale"][0][1:])] + c["scale"][1:]},
     "entry 0: 'vision.blocks.0.norm1' is not a decoder-layer module name"),
    (lambda c: {"scale": c["scale"][:1] + [(c["scale"][1][0], c["scale"][1][1], c["scale"][1][2][:-1])]},
     "has 256 input channels, the cache has 255 scales"),
])
def test_bad_imported_cache_is_one_line_and_leaves_nothing(pipe, model, tmp_path, edit, message):
    from vlmquant.search.pipeline import run_import

    src = tmp_path / "bad.pt"
    torch.save(edit(load_cache(cache_of(pipe))), src)
    spec = run_spec("imported", method="mbq", w_bit=3, scale_cache=str(src))
    with pytest.raises(VlmquantError, match=message) as e:
        run_import(model, spec, src, tmp_path / "cache.pt", {"model": MODEL})
    assert "\n" not in str(e.value) and str(src) in str(e.value) and not (tmp_path / "cache.pt").exists()
