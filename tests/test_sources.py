"""Files read from outside results/: content fingerprints per file version, non-finite weights, model folders
without tokenizer files, truncated shards. No Snakemake here (tests/test_workflow_edits.py runs it)."""
import dataclasses
import hashlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import check, keep_times, open_demo, run_spec
from vlmquant.errors import VlmquantError
from vlmquant.export import export_checkpoint
from vlmquant.export.checkpoint import check_complete
from vlmquant.io import fingerprint
from vlmquant.io.scales import save_cache
from vlmquant.models.loading import Checkpoint

RTN = run_spec("rtn-w3g128", method="rtn", w_bit=3, w_group=128)
LAYER_WEIGHT = "model.layers.1.mlp.down_proj.weight"  # a decoder weight, as the demo folder names it


def one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


@pytest.fixture
def model_copy(demo_model_path, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(demo_model_path, folder)
    return folder


# --- fingerprints -------------------------------------------------------------------------------------
def test_fingerprint_is_the_content_hash_and_sees_a_same_size_rewrite_with_old_times(tmp_path, monkeypatch):
    cache = tmp_path / "results" / ".fingerprints.json"
    fingerprint.use_cache(cache)
    try:
        f = tmp_path / "a.txt"
        f.write_bytes(b"0123456789")
        assert fingerprint.fingerprints([f]) == {str(f): hashlib.sha256(b"0123456789").hexdigest()}
        assert cache.is_file()
        keep_times(f, lambda p: p.write_bytes(b"9876543210"))  # same size, same mtime: a new ctime
        assert fingerprint.fingerprints([f])[str(f)] == hashlib.sha256(b"9876543210").hexdigest()
        fingerprint.use_cache(cache)  # as a new process: read back from the file, not hashed again
        monkeypatch.setattr(fingerprint, "scan", lambda path, **kw: pytest.fail(f"{path} hashed again"))
        assert fingerprint.fingerprints([f])[str(f)] == hashlib.sha256(b"9876543210").hexdigest()
    finally:
        fingerprint.use_cache(None)


def test_one_read_gives_the_file_hash_and_every_floating_tensors_nonfinite_count(tmp_path, monkeypatch):
    """scan hashes the bytes and counts NaN/±Inf block by block (4 KiB blocks here, so tensors cross block edges, with
    bad values on both sides of an edge): the hash equals hashlib's of the whole file, the counts a plain
    isnan/isinf count of each tensor loaded by safetensors; integer tensors are not counted."""
    import mmap

    monkeypatch.setattr(fingerprint, "BLOCK", mmap.ALLOCATIONGRANULARITY)
    torch.manual_seed(0)
    weights = {"a_f32": torch.randn(3000), "b_bf16": torch.randn(5000).to(torch.bfloat16),
               "c_f16": torch.randn(700).half(), "d_f8": torch.randn(9000).to(torch.float8_e4m3fn),
               "e_int": torch.arange(2000, dtype=torch.int32), "f_clean": torch.randn(4000)}
    weights["a_f32"][[0, 1023, 1024, 2999]] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")])
    weights["b_bf16"][[100, 2047, 2048, 4999]] = float("nan")
    weights["c_f16"][5] = float("inf")
    weights["d_f8"].view(torch.uint8)[[0, 4095, 4096]] = 0x7F  # e4m3fn's NaN
    path = tmp_path / "w.safetensors"
    save_file(weights, path)
    sha, counts = fingerprint.scan(path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    expected = {}
    for name, t in load_file(path).items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t.float())).sum())
            if bad:
                expected[name] = bad
    assert counts == expected == {"a_f32": 4, "b_bf16": 4, "c_f16": 1, "d_f8": 3}
    assert fingerprint.nonfinite_counts(path) == counts and fingerprint.sha256_file(path) == sha


def test_the_files_of_one_call_are_read_on_threads_with_the_same_entries(tmp_path, monkeypatch):
    """file_entries of several files (threads) gives each file the entry it gets alone; a truncated shard among them
    is named before any file is read."""
    fingerprint.use_cache(None)
    files = []
    for i in range(4):
        path = tmp_path / f"s{i}.safetensors"
        t = torch.randn(512)
        t[i] = float("nan")
        save_file({f"w{i}": t}, path)
        files.append(path)
    files.append(tmp_path / "config.json")
    files[-1].write_text("{}")
    together = fingerprint.file_entries(files)
    for f in files:
        fingerprint.use_cache(None)
        assert fingerprint.file_entries([f])[str(f)] == together[str(f)]
    assert [together[str(f)]["nonfinite"] for f in files[:4]] == [{f"w{i}": 1} for i in range(4)]
    assert "nonfinite" not in together[str(files[-1])]
    fingerprint.use_cache(None)
    files[2].write_bytes(files[2].read_bytes()[:-4])
    monkeypatch.setattr(fingerprint, "scan", lambda path, **kw: pytest.fail(f"{path} read before the check"))
    with pytest.raises(VlmquantError, match="s2.safetensors: safetensors shard is"):
        fingerprint.file_entries(files)


# --- non-finite weights -------------------------------------------------------------------------------
def put_nan(folder, count=3):
    path = folder / "model.safetensors"
    weights = load_file(path)
    weights[LAYER_WEIGHT].view(-1)[:count] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})
    return path


def test_nan_weight_is_refused_at_load_naming_file_tensor_and_count(cfg, model_copy, tmp_path):
    path = put_nan(model_copy)
    cfg["models"]["demo-qwen2vl"]["path"] = str(model_copy)
    checked = check(cfg)  # the folder is complete: the weights are read by check_models
    from vlmquant.workflow import check_models

    with pytest.raises(VlmquantError) as e:
        check_models(checked)
    assert one_line(e) == (f"config: models.demo-qwen2vl.path: {path}: tensor {LAYER_WEIGHT} has 3 non-finite values "
                           "(NaN or Inf); fix or replace the model's weights (nothing non-finite is quantized or written)")


@pytest.mark.parametrize("stream", ["never", "always"])
def test_nan_weight_writes_no_checkpoint(model_copy, tmp_path, stream):
    path = put_nan(model_copy)
    model = dataclasses.replace(open_demo(model_copy), stream=stream)
    out = tmp_path / "checkpoint"
    with pytest.raises(VlmquantError) as e:
        export_checkpoint(model, RTN, out)
    assert one_line(e).startswith(f"{path}: tensor {LAYER_WEIGHT} has 3 non-finite values")
    assert not out.exists() and not list(tmp_path.glob(".checkpoint.*"))


def test_finished_folder_with_a_nan_or_without_tokenizer_is_refused(model_copy, tmp_path):
    out = tmp_path / "checkpoint"
    put_nan(model_copy, count=1)
    with pytest.raises(VlmquantError) as e:
        check_complete(model_copy, out)
    assert one_line(e).startswith(f"{out / 'model.safetensors'}: tensor {LAYER_WEIGHT} has 1 non-finite values")
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(VlmquantError) as e:
        check_complete(model_copy, out)
    assert one_line(e).startswith(f"{out}: no tokenizer (tokenizer.json or ")


def test_nan_scale_is_never_written_to_a_cache(tmp_path):
    s = torch.ones(8)
    s[2] = float("inf")
    with pytest.raises(VlmquantError) as e:
        save_cache({"scale": [("layers.0.input_layernorm", ("layers.0.self_attn.q_proj",), s)]}, tmp_path / "c.pt")
    assert one_line(e).startswith(f"{tmp_path / 'c.pt'}: tensor scales of layers.0.input_layernorm has 1 non-finite")
    assert list(tmp_path.iterdir()) == []


# --- model folders -------------------------------------------------------------------------------------
def test_model_folder_without_tokenizer_files_is_refused_at_load(cfg, model_copy):
    cfg["models"]["demo-qwen2vl"]["path"] = str(model_copy)
    (model_copy / "tokenizer.json").unlink()
    (model_copy / "chat_template.jinja").unlink()
    with pytest.raises(VlmquantError) as e:
        check(cfg)
    assert one_line(e) == (f"config: models.demo-qwen2vl.path: {model_copy}: no tokenizer (tokenizer.json or "
                           "tokenizer.model or vocab.json or tokenizer.tiktoken or vocab.txt); no chat template "
                           "(chat_template.jinja or chat_template.json); copy them from the model's release into the "
                           "model folder")


def test_export_without_tokenizer_files_leaves_no_checkpoint(model_copy, tmp_path):
    (model_copy / "processor_config.json").unlink()
    out = tmp_path / "checkpoint"
    with pytest.raises(VlmquantError) as e:
        export_checkpoint(open_demo(model_copy), RTN, out)
    assert one_line(e).startswith(f"{out}: no processor (processor_config.json or preprocessor_config.json)")
    assert not out.exists() and not list(tmp_path.glob(".checkpoint.*"))


def test_truncated_shard_is_refused_at_load_naming_it(cfg, model_copy):
    shard = model_copy / "model.safetensors"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    cfg["models"]["demo-qwen2vl"]["path"] = str(model_copy)
    with pytest.raises(VlmquantError) as e:
        check(cfg)
    assert one_line(e) == (f"config: models.demo-qwen2vl.path: {shard}: safetensors shard is {size - 1000} bytes, its "
                           f"header says {size} (truncated or damaged copy); copy the shard again")
    with pytest.raises(VlmquantError, match=f"^{shard}: safetensors shard is"):
        Checkpoint(model_copy)


def test_a_built_demo_model_folder_is_checked_at_load_as_any_other(cfg, demo_model_path, tmp_path):
    """The demo rules' folder (results/demo/model-qwen2_vl) once built: a truncated shard or a missing tokenizer is
    one line at load, and the memory estimate names the shard instead of a SafetensorError traceback."""
    from vlmquant.workflow.resources import model_params

    folder = tmp_path / cfg["models"]["demo-qwen2vl"]["path"]
    check(cfg)  # not built yet: nothing to check
    shutil.copytree(demo_model_path, folder)
    n = model_params(folder)
    assert n == sum(t.numel() for t in load_file(folder / "model.safetensors").values())
    check(cfg)
    shard = folder / "model.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(VlmquantError, match=r"^config: models.demo-qwen2vl.path: .*model.safetensors: safetensors "
                                            r"shard is \d+ bytes, its header says"):
        check(cfg)
    with pytest.raises(VlmquantError, match=f"^{shard}: safetensors shard is"):
        model_params.__wrapped__(folder)  # uncached (one count per folder and process)


def test_eval_refuses_a_checkpoint_from_other_weights(model_copy, demo_model_path, tmp_path):
    """The checkpoint records its source's weights fingerprint; once the folder holds other weights (same size,
    old times), eval names both fingerprints."""
    from vlmquant.eval.run import run_eval
    from vlmquant.io.provenance import weights_fingerprint

    before = weights_fingerprint(model_copy)
    info = export_checkpoint(open_demo(model_copy), RTN, tmp_path / "checkpoint")
    assert info["source_weights"] == before
    keep_times(model_copy / "model.safetensors",
               lambda p: p.write_bytes(p.read_bytes()[:-4] + bytes(4)))  # the last float changed, same size
    settings = {"batch_size": 4, "kl_top_k": 0, "hidden_positions": 16}
    with pytest.raises(VlmquantError) as e:
        run_eval(open_demo(model_copy), tmp_path / "checkpoint", "inputs", "ref", tmp_path / "eval.parquet", settings, {})
    assert one_line(e).startswith(f"{tmp_path / 'checkpoint'}: checkpoint: was made from other weights than "
                                  f"{model_copy} holds now (weights fingerprint {before[:12]}, the folder's "
                                  f"{weights_fingerprint(model_copy)[:12]})")
