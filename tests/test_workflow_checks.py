"""What the workflow checks when it loads (the schema's errors name the key, defaults are filled, names are
cross-checked; paths, w_group, eval vs search sets, YAML syntax), the files a job reads, the weights fingerprint,
the scripts' logging and output permissions. No Snakemake here."""
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DEFAULT_CONFIG, REPO, check, default_config
from vlmquant import paths
from vlmquant.data.calib import build_calib, sample_rows
from vlmquant.errors import VlmquantError
from vlmquant.io import tensors
from vlmquant.io.atomic import atomic_dir
from vlmquant.io.provenance import check_weights, weights_fingerprint
from vlmquant.io.scales import check_cache_weights, save_cache
from vlmquant.data.overlap import check_eval_parquets
from vlmquant.eval.run import run_eval
from vlmquant.workflow import (calib_params, calib_sources, check_calib_sets, check_yaml, model_files,
                               quantized_widths, targets)

def error(cfg):
    with pytest.raises(VlmquantError) as e:
        check(cfg)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_the_tests_config_is_the_shipped_default():
    """tests/data/config.yaml is config.yaml as committed; the checkout's config.yaml is the user's to edit
    (adding runs to targets must not fail the tests) and no test reads it."""
    res = subprocess.run(["git", "show", "HEAD:config.yaml"], cwd=REPO, capture_output=True, text=True)
    if res.returncode:
        pytest.skip("not a git checkout")
    assert DEFAULT_CONFIG.read_text() == res.stdout, "the default config.yaml changed: copy it to tests/data/"


def test_default_config_is_valid_and_filled(cfg):
    out = check(cfg)
    assert out["device"] == "auto"
    assert out["calib"]["demo"]["prompt"] == "Describe this image."
    assert out["runs"]["mbq-w3g128"]["reweight"] is True
    assert "reweight" not in out["runs"]["awq-w3g128"]  # awq has no such setting
    assert out["runs"]["mbq-w3g128"]["n_grid"] == 20
    assert out["memory"] == {"stream": "auto", "max_batch_mb": None, "grads_store_mb": None}
    del cfg["memory"]
    assert check(cfg)["memory"] == out["memory"]  # the block is optional
    assert targets(out)


def test_runs_are_normalised_to_their_method_settings(cfg):
    out = check(cfg)["runs"]
    assert out["rtn-w3g128"] == {"method": "rtn", "w_bit": 3, "w_group": 128}
    assert out["mbq-w3g128"] == {"method": "mbq", "w_bit": 3, "w_group": 128, "loss": "mae", "n_grid": 20,
                                 "reweight": True}
    assert out["mbq-w4a8"] == {"method": "mbq", "w_bit": 4, "a_bit": 8, "loss": "mae", "n_grid": 20, "reweight": True}
    assert out["smoothquant-w8a8"] == {"method": "smoothquant", "w_bit": 8, "a_bit": 8, "loss": "mae", "alpha": 0.5,
                                       "smooth": "norms"}


def test_family_is_read_from_the_model_folder(cfg, demo_model_path):
    cfg["models"]["demo-qwen2vl"] = {"path": str(demo_model_path)}
    assert check(cfg)["models"]["demo-qwen2vl"]["family"] == "qwen2_vl"
    cfg["models"]["demo-qwen2vl"] = {"path": "results/demo/model-llava"}  # a demo model not built yet
    assert check(cfg)["models"]["demo-qwen2vl"]["family"] == "llava"


def test_unknown_model_type_names_the_folder_and_the_families(cfg, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt5_vl"}')
    cfg["models"]["demo-qwen2vl"] = {"path": str(tmp_path)}
    with pytest.raises(VlmquantError) as e:
        check(cfg)
    msg = str(e.value)
    assert f"models.demo-qwen2vl.path: {tmp_path} has model_type 'gpt5_vl'" in msg and "qwen2_vl" in msg


def test_distort_false_is_the_same_run_as_no_distort_and_true_the_reference(cfg):
    plain = check(cfg)["runs"]["awq-w3g128"]
    cfg["runs"]["awq-w3g128"]["distort"] = False
    assert check(cfg)["runs"]["awq-w3g128"] == plain
    for value, run in ((True, "reference"), ("reference", "reference"), ("layer", "layer")):
        cfg["runs"]["awq-w3g128"]["distort"] = value
        assert check(cfg)["runs"]["awq-w3g128"] == {**plain, "distort": run}


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["calib"]["demo"].update(n_samples="x"), "calib.demo.n_samples: 'x' is not of type 'integer'"),
    (lambda c: c["calib"]["demo"].update(sed=1), "config: calib.demo.sed: unknown key (did you mean seed?)"),
    (lambda c: c["calib"]["demo"].update(format="fewshot"), "calib.demo.format: 'fewshot' is not one of"),
    (lambda c: c["models"]["demo-qwen2vl"].update(family="gpt5"), "models.demo-qwen2vl.family: 'gpt5' is not one of"),
    (lambda c: c["runs"]["rtn-w3g128"].update(method="autoround"), "runs.rtn-w3g128.method: 'autoround' is not one of"),
    (lambda c: c["runs"]["rtn-w3g128"].update(n_grid=10), "runs.rtn-w3g128.n_grid: rtn does not use n_grid"),
    (lambda c: c["runs"]["mbq-w4a8"].update(w_group=64), "runs.mbq-w4a8.w_group: weight-activation runs (a_bit)"),
    (lambda c: c.update(devise="cpu"), "config: devise: unknown key (did you mean device?)"),
    (lambda c: c["memory"].update(stream="sometimes"), "memory.stream: 'sometimes' is not one of ['auto', 'always', 'never']"),
    (lambda c: c["memory"].update(max_batch_mb=0), "memory.max_batch_mb: 0 is less than the minimum of 1"),
    (lambda c: c["runs"]["mbq-w3g128"].update(w_bit=1), "runs.mbq-w3g128.w_bit: 1 is less than the minimum"),
    (lambda c: c["targets"].update(models=["nope"]), "targets.models: 'nope' is not defined"),
    (lambda c: c["runs"]["awq-w3g128"].update(reweight=True), "runs.awq-w3g128.reweight: awq does not use reweight (only mbq reweights)"),
    (lambda c: c["runs"]["awq-w3g128"].update(method="smoothquant"), "runs.awq-w3g128.a_bit: smoothquant smooths"),
    (lambda c: c["runs"]["awq-w3g128"].update(alpha=0.5), "runs.awq-w3g128.alpha: awq does not use alpha (only smoothquant takes it)"),
    (lambda c: c["runs"]["mbq-w4a8"].update(method="smoothquant", alpha=1.5), "runs.mbq-w4a8.alpha: 1.5 is greater"),
    (lambda c: c["runs"]["rtn-w3g128"].update(distort=True), "runs.rtn-w3g128.distort: rtn does not use distort"),
    (lambda c: c["runs"]["awq-w3g128"].update(distort="yes"), "runs.awq-w3g128.distort: 'yes' is not one of [True, False, 'reference', 'layer']"),
    (lambda c: c["runs"]["awq-w3g128"].update(smooth="all"), "runs.awq-w3g128.smooth: awq does not use smooth (only smoothquant takes it)"),
    (lambda c: c["runs"]["mbq-w4a8"].update(method="smoothquant", smooth="some"), "runs.mbq-w4a8.smooth: 'some' is not one of ['norms', 'all']"),
])
def test_bad_config_names_the_key(cfg, edit, needle):
    edit(cfg)
    with pytest.raises(VlmquantError) as e:
        check(cfg)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_calib_params_drop_unused_corpus(cfg):
    out = check(cfg)
    assert "text" not in calib_params(out["calib"]["demo"])
    out["calib"]["demo"]["format"] = "interleave"
    assert "text" in calib_params(out["calib"]["demo"])


def test_eval_export_lmms_config_defaults(cfg):
    for key in ("eval", "export", "lmms_eval"):
        cfg.pop(key)
    cfg = check(cfg)
    assert cfg["eval"] == {"calib": "demo-holdout", "batch_size": 4, "kl_top_k": 1000, "hidden_positions": 16,
                           "mem_mb": None, "allow_overlap": False}
    assert cfg["export"] == {"formats": ["compressed-tensors"], "ignore": [], "max_shard_size": "5GB", "mem_mb": None}
    assert cfg["lmms_eval"]["enabled"] is False and cfg["lmms_eval"]["limit"] is None
    assert not any("lmms_eval" in t for t in targets(cfg))
    cfg["lmms_eval"]["enabled"] = True
    model, runs = "demo-qwen2vl", ("rtn-w3g128", "awq-w3g128", "mbq-w3g128")
    assert {t for t in targets(cfg) if "lmms_eval" in t} == {
        paths.LMMS.format(model=model, calib="demo", run=r) for r in runs} | {paths.LMMS_FP.format(model=model)}


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["eval"].update(calib="nope"), "eval.calib: 'nope' is not defined under 'calib'"),
    (lambda c: c["eval"].update(kl_topk=5), "eval.kl_topk: unknown key (did you mean kl_top_k?)"),
    (lambda c: c["eval"].update(batch_size=0), "eval.batch_size"),
    (lambda c: c["export"].update(max_shard_size="5 gigs"), "export.max_shard_size"),
    (lambda c: c["export"].update(ignore="mlp.down_proj"), "export.ignore"),
    (lambda c: c["lmms_eval"].update(limit=0), "lmms_eval.limit"),
    (lambda c: c["lmms_eval"].update(taks=["mme"]), "lmms_eval.taks: unknown key (did you mean tasks?)"),
])
def test_bad_eval_export_lmms_config_names_the_key(cfg, edit, needle):
    edit(cfg)
    with pytest.raises(VlmquantError, match=re.escape(needle)):
        check(cfg)


@pytest.fixture
def user_data(tmp_path, demo_data, monkeypatch):
    """The demo's data at a user path (not built by the demo rules): data/{captions_*.json, images/}; the
    working directory is tmp_path (the workflow keeps the sets' file lists under results/calib/)."""
    shutil.copytree(demo_data, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "data"


def use_data(cfg, data):
    for name, split in (("demo", "train"), ("demo-holdout", "val")):
        cfg["calib"][name].update(captions=str(data / f"captions_{split}.json"), images=str(data / "images"))
    del cfg["calib"]["demo"]["text"]


# --- paths --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["calib"]["demo"].update(captions="results/demo/data/captions_trian.json"),
     "config: calib.demo.captions: results/demo/data/captions_trian.json not found"),
    (lambda c: c["calib"]["demo"].update(images="/no/such/folder"), "config: calib.demo.images: /no/such/folder not found"),
    (lambda c: c["calib"]["demo"].update(text="corpus.jsonl"), "config: calib.demo.text: corpus.jsonl not found"),
    (lambda c: c["calib"]["demo"].update(images=str(DEFAULT_CONFIG)),
     f"config: calib.demo.images: {DEFAULT_CONFIG} is not a folder"),
    (lambda c: c["models"]["demo-qwen2vl"].update(path="/models/Qwen2-VL-7B"),
     "config: models.demo-qwen2vl.path: /models/Qwen2-VL-7B has no config.json"),
    (lambda c: c["runs"]["awq-w3g128"].update(scale_cache="caches/awq.pt"),
     "config: runs.awq-w3g128.scale_cache: caches/awq.pt not found"),
])
def test_every_path_the_config_names_is_checked_at_load(cfg, edit, needle):
    edit(cfg)
    assert needle in error(cfg)


def test_demo_outputs_need_not_exist_yet(cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing built here
    out = check(cfg)
    assert out["models"]["demo-qwen2vl"]["family"] == "qwen2_vl"
    cfg["models"]["demo-qwen2vl"]["path"] = "results/demo/model-gpt5"  # not a family the demo rules build
    assert "models.demo-qwen2vl.path: results/demo/model-gpt5" in error(cfg)


def test_model_folder_without_weights_is_refused(cfg, tmp_path, demo_model_path):
    shutil.copy(demo_model_path / "config.json", tmp_path / "config.json")
    cfg["models"]["demo-qwen2vl"]["path"] = str(tmp_path)
    assert error(cfg) == f"config: models.demo-qwen2vl.path: {tmp_path} has no *.safetensors weights"


# --- YAML syntax --------------------------------------------------------------------------------------
def test_yaml_syntax_error_names_its_line(tmp_path):
    path = tmp_path / "config.yaml"
    lines = DEFAULT_CONFIG.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if "n_samples: 8" in line)
    lines[n] = lines[n].replace("n_samples: 8", "n_samples: 8: 9")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(VlmquantError) as e:
        check_yaml(path)
    assert str(e.value).startswith(f"{path}: line {n + 1}, column ") and "mapping values are not allowed" in str(e.value)
    check_yaml(DEFAULT_CONFIG)
    check_yaml(tmp_path / "absent.yaml")  # left to Snakemake


def copy_of(cfg):
    return json.loads(json.dumps(cfg))


# --- w_group ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [0, -5, 1, 2, 100, 24])
def test_w_group_outside_what_the_quantizer_and_formats_take_is_refused(cfg, group):
    cfg["runs"]["rtn-w3g128"]["w_group"] = group
    assert error(cfg) == (f"config: runs.rtn-w3g128.w_group: {group} is not supported; use -1 (one group per output "
                          "row) or a positive multiple of 16 (32, 64 and 128 are served by vLLM)")


@pytest.mark.parametrize("group", [-1, 16, 64, 128, 256])
def test_w_group_dividing_every_width_passes(cfg, group):
    cfg["runs"]["awq-w3g128"]["w_group"] = group
    assert check(cfg)["runs"]["awq-w3g128"]["w_group"] == group


def test_w_group_not_dividing_a_width_fails_at_load(cfg, demo_model_path):
    """The demo's widths: hidden 256 (q, k, v, gate, up, and o: 4 heads × 64), intermediate 768 (down)."""
    cfg["models"]["demo-qwen2vl"]["path"] = str(demo_model_path)
    assert quantized_widths(cfg["models"]["demo-qwen2vl"]) == {256: "hidden_size", 768: "intermediate_size"}
    cfg["runs"]["awq-w3g128"]["w_group"] = 512
    assert error(cfg) == ("config: runs.awq-w3g128.w_group: 512 does not divide hidden_size = 256 of model "
                          "'demo-qwen2vl'; use -1 or one of [16, 32, 64, 128, 256]")
    cfg["runs"]["awq-w3g128"]["w_group"] = 48  # a multiple of 16 dividing neither
    assert "48 does not divide hidden_size = 256" in error(cfg)
    cfg["targets"]["runs"] = ["rtn-w3g128"]  # a run outside the targets is not built: only its value is checked
    assert check(cfg)


def test_nvfp4_w4a4_on_a_mixture_of_experts_model_is_refused_at_load(cfg):
    """One line naming the run and the model, before any job; NVFP4A16 (no a_bit) on the same model passes, and so
    does NVFP4 W4A4 on a dense model."""
    cfg["targets"]["runs"] = ["mbq-nvfp4"]
    assert check(copy_of(cfg))  # the demo Qwen2-VL: dense
    cfg["models"]["demo-qwen2vl"] = {"family": "qwen3_vl_moe", "path": "results/demo/model-qwen3_vl_moe"}
    assert error(copy_of(cfg)) == ("config: runs.mbq-nvfp4: NVFP4 W4A4 is not supported on model 'demo-qwen2vl' "
                                   "(qwen3_vl_moe, mixture of experts): no static input scales for fused experts yet; "
                                   "drop a_bit (NVFP4A16) or the model from targets")
    cfg["targets"]["runs"] = ["mbq-nvfp4a16"]
    assert check(copy_of(cfg))


def test_widths_of_moe_and_separate_head_dim(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", "text_config": {
        "hidden_size": 2048, "num_attention_heads": 32, "head_dim": 128, "intermediate_size": 6144,
        "moe_intermediate_size": 768}}))
    assert quantized_widths({"path": str(tmp_path)}) == {2048: "hidden_size", 4096: "num_attention_heads × head_dim",
                                                         6144: "intermediate_size", 768: "moe_intermediate_size"}


# --- eval set vs search sets --------------------------------------------------------------------------
def test_eval_set_that_is_a_search_set_is_refused(cfg):
    cfg["eval"]["calib"] = "demo"
    assert error(cfg) == ("config: eval.calib: 'demo' is also a search set (targets.calib); evaluate on held-out "
                          "images, or set eval.allow_overlap: true")
    cfg["eval"]["allow_overlap"] = True
    assert check(cfg)["eval"]["calib"] == "demo"


def test_a_text_eval_set_is_refused(cfg):
    """format text has no images: the eval's vision metrics would be empty and the held-out check (by image
    content) would pass an eval set made of the search set's own conversations."""
    held = cfg["eval"]["calib"]
    cfg["calib"][held]["format"] = "text"
    assert error(cfg) == (f"config: calib.{held}.format: the eval set (eval.calib) has no images in format text, so "
                          "its vision metrics are empty and the held-out check (by image) cannot run; use plain")
    cfg["calib"][held]["format"] = "plain"
    cfg["calib"]["demo"]["format"] = "text"  # a text search set is fine
    assert check(cfg)["calib"]["demo"]["format"] == "text"


def test_overlap_by_image_content_names_both_sets(cfg, user_data, tmp_path):
    use_data(cfg, user_data)
    out = check(cfg)
    check_calib_sets(out)  # the demo's splits are disjoint
    # the held-out set's images renamed: other names, same content
    renamed = tmp_path / "renamed"
    shutil.copytree(user_data / "images", renamed)
    captions = json.loads((user_data / "captions_train.json").read_text())
    out["calib"]["demo-holdout"].update(captions=str(user_data / "captions_train.json"), images=str(renamed), seed=7)
    for f in captions["images"]:
        (renamed / f["file_name"]).rename(renamed / f"copy-{f['file_name']}")
        f["file_name"] = f"copy-{f['file_name']}"
    (tmp_path / "copies.json").write_text(json.dumps(captions))
    out["calib"]["demo-holdout"]["captions"] = str(tmp_path / "copies.json")
    with pytest.raises(VlmquantError) as e:
        check_calib_sets(out)
    msg = str(e.value)
    assert msg.startswith("config: eval.calib: 'demo-holdout' shares ") and "with search set 'demo'" in msg
    assert str(renamed / "copy-") in msg and msg.endswith("or set eval.allow_overlap: true")
    out["eval"]["allow_overlap"] = True
    check_calib_sets(out)


def test_eval_job_checks_the_parquets(cfg, user_data, tmp_path, caplog):
    use_data(cfg, user_data)
    out = check(cfg)
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    build_calib(out["calib"]["demo"], a, "demo")
    build_calib(out["calib"]["demo-holdout"], b, "demo-holdout")
    check_eval_parquets("demo-holdout", b, "demo", a)
    shutil.copy(a, tmp_path / "c.parquet")
    with pytest.raises(VlmquantError, match="'demo-holdout' shares 8 of its 8 images with search set 'demo'"):
        check_eval_parquets("demo-holdout", tmp_path / "c.parquet", "demo", a)
    with caplog.at_level(logging.WARNING):
        check_eval_parquets("demo-holdout", b, "demo", b, allow=True)
    assert "(allowed by eval.allow_overlap)" in caplog.text
    # the eval job's one call: refused before the model, checkpoint or inputs are read, and no table written
    ids = {"model": "m", "eval_calib": "demo-holdout", "calib": "demo", "run": "r"}
    with pytest.raises(VlmquantError, match="'demo-holdout' shares 8 of its 8 images with search set 'demo'"):
        run_eval(None, tmp_path / "none", tmp_path / "none", tmp_path / "none", tmp_path / "eval.parquet", {}, ids,
                 held_out=(tmp_path / "c.parquet", a))
    assert not (tmp_path / "eval.parquet").exists()


def test_missing_image_of_a_set_fails_at_load(cfg, user_data):
    use_data(cfg, user_data)
    out = check(cfg)
    used = calib_sources(out["calib"]["demo"], "demo")["images"]
    os.unlink(used[3])
    with pytest.raises(VlmquantError, match=r"config: calib.demo.images: .*not found \(1 of the 8 images the set uses"):
        check_calib_sets(out)


# --- the files a job reads ----------------------------------------------------------------------------
def test_calib_inputs_are_the_images_the_set_uses(cfg, user_data):
    use_data(cfg, user_data)
    out = check(cfg)
    files = calib_sources(out["calib"]["demo"], "demo")
    want = sorted({str(user_data / "images" / f) for row in sample_rows(out["calib"]["demo"], "demo")
                   for f in row.file_names})
    assert files == {"captions": str(user_data / "captions_train.json"), "images": want} and len(want) == 8
    all_images = sorted(str(p) for p in (user_data / "images").iterdir())
    assert set(want) < set(all_images)  # not the whole folder
    demo = calib_sources(check(default_config())["calib"]["demo"], "demo")
    assert demo == {"captions": paths.DEMO_FILES["captions_train"], "images": paths.DEMO_FILES["images"]}


def test_calib_file_list_is_kept_until_the_source_or_settings_change(cfg, user_data, tmp_path):
    use_data(cfg, user_data)
    out = check(cfg)["calib"]["demo"]
    first = calib_sources(out, "demo")["images"]
    kept = tmp_path / paths.CALIB_FILES.format(calib="demo")
    assert json.loads(kept.read_text())["files"] == first
    other = sorted({p.name for p in (user_data / "images").iterdir()} - {os.path.basename(f) for f in first})[0]
    kept.write_text(kept.read_text().replace(os.path.basename(first[0]), other))  # marks the kept list
    assert calib_sources(out, "demo")["images"][0].endswith(other)  # same key: the kept list is used
    captions = user_data / "captions_train.json"
    captions.write_text(captions.read_text() + "\n")  # the source changed: drawn again
    assert calib_sources(out, "demo")["images"] == first
    assert len(calib_sources({**out, "n_samples": 3}, "demo")["images"]) == 3


def test_model_inputs_are_its_files(demo_model_path, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(demo_model_path, folder)
    (folder / "README.md").write_text("notes")
    names = [os.path.basename(f) for f in model_files(str(folder))]
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(names)
    assert "README.md" not in names
    processor = [os.path.basename(f) for f in model_files(str(folder), weights=False)]
    assert set(processor) == set(names) - {"model.safetensors"}
    demo = paths.DEMO_MODEL.format(family="qwen2_vl")
    assert model_files(demo) == [demo]


# --- weights fingerprint ------------------------------------------------------------------------------
def test_weights_fingerprint_follows_the_values_not_the_copy(demo_model_path, tmp_path):
    a = tmp_path / "a"
    shutil.copytree(demo_model_path, a, copy_function=shutil.copyfile)  # new times
    assert weights_fingerprint(a) == weights_fingerprint(demo_model_path)
    weights = load_file(a / "model.safetensors")
    torch.manual_seed(1)
    name = sorted(weights)[len(weights) // 2]
    weights[name] = torch.randn_like(weights[name])  # same shapes, other values
    save_file(weights, a / "model.safetensors", metadata={"format": "pt"})
    assert weights_fingerprint(a) != weights_fingerprint(demo_model_path)
    with pytest.raises(VlmquantError) as e:
        check_weights(weights_fingerprint(demo_model_path), a, "cache.pt: scale cache")
    assert str(e.value).startswith(f"cache.pt: scale cache: was made from other weights than {a} holds now")
    check_weights(None, a, "old cache")  # no fingerprint recorded: accepted


def test_scale_cache_from_other_weights_is_refused(demo_model_path, tmp_path):
    cache = tmp_path / "scale_cache.pt"
    save_cache({"scale": [], "meta": {"model": "m", "weights": "0" * 64}}, cache)
    with pytest.raises(VlmquantError, match=f"{cache}: scale cache: was made from other weights"):
        check_cache_weights(cache, demo_model_path)
    save_cache({"scale": [], "meta": {"model": "m", "weights": weights_fingerprint(demo_model_path)}}, cache)
    check_cache_weights(cache, demo_model_path)
    check_cache_weights(None, demo_model_path)  # RTN: no cache


def test_export_pack_and_eval_refuse_a_scale_cache_from_other_weights(demo_model_path, tmp_path):
    """read_cache, which export, pack and the in-memory eval (resident and streamed) all go through, checks the
    cache's weights fingerprint before its scales are read or folded: one line, nothing written."""
    from vlmquant.export.checkpoint import read_cache, streamed_pseudo
    from vlmquant.export.packed import export_packed
    from vlmquant.models.loading import open_model
    from vlmquant.spec import RunSpec

    cache = tmp_path / "scale_cache.pt"
    save_cache({"scale": [], "meta": {"model": "m", "weights": "0" * 64}}, cache)
    spec = RunSpec.from_config("mbq", {"method": "mbq", "w_bit": 4, "w_group": 128})
    model = open_model({"family": "qwen2_vl", "path": str(demo_model_path)}, "cpu")
    refused = f"{cache}: scale cache: was made from other weights than {demo_model_path}"
    for call in (lambda: read_cache(spec, demo_model_path, cache), lambda: streamed_pseudo(model, spec, cache),
                 lambda: export_packed(model, spec, tmp_path / "packed", cache_path=cache)):
        with pytest.raises(VlmquantError) as e:
            call()
        assert str(e.value).startswith(refused)
    assert not (tmp_path / "packed").exists()


# --- scripts' logging ---------------------------------------------------------------------------------
JOB = """
import sys, time, types
from tqdm import tqdm
from vlmquant.errors import VlmquantError
from vlmquant.workflow import script_logging
snakemake = types.SimpleNamespace(log=[sys.argv[1]], rule="search", wildcards=["m", "c", "r", "000"])
with script_logging(snakemake):
    import logging
    logging.getLogger("x").info("loading")
    for _ in tqdm(range(3), desc="search", unit="layer"):  # the job's own bar: on the terminal however short
        pass
    for _ in tqdm(range(3), desc="convert"):  # STATUS_MIN seconds or more: on the terminal
        time.sleep(0.7)
    for _ in tqdm(range(3), desc="quick"):  # under STATUS_MIN seconds: the log only
        pass
    {body}
"""


def run_job(tmp_path, body):
    log = tmp_path / "job.log"
    res = subprocess.run([sys.executable, "-c", JOB.replace("{body}", body), str(log)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return res, log.read_text()


def test_any_error_lands_in_the_log_with_its_traceback(tmp_path):
    res, log = run_job(tmp_path, "{}['missing']")
    assert res.returncode == 1
    assert "loading" in log and "Traceback (most recent call last)" in log and "KeyError: 'missing'" in log
    lines = res.stderr.strip().splitlines()
    assert lines[-1] == f"[search m/c/r/000] error: KeyError: 'missing' (traceback in {tmp_path / 'job.log'})"
    assert "Traceback" not in res.stderr


def test_vlmquant_error_is_one_line_in_log_and_terminal(tmp_path):
    res, log = run_job(tmp_path, "raise VlmquantError('calib.x: bad')")
    assert res.returncode == 1
    assert log.strip().endswith("error: calib.x: bad") and "Traceback" not in log
    assert res.stderr.strip().splitlines()[-1] == "[search m/c/r/000] error: calib.x: bad"


def test_progress_bars_end_as_one_status_line_on_the_terminal(tmp_path):
    res, log = run_job(tmp_path, "pass")
    assert res.returncode == 0
    own, slow = res.stderr.strip().splitlines()
    assert own.startswith("[search m/c/r/000] search: 3/3 [00:00<00:00") and "█" not in own
    assert slow.startswith("[search m/c/r/000] convert: 3/3 [00:02<00:00") and "█" not in slow
    assert all(f"{bar}: 100%|" in log for bar in ("search", "convert", "quick"))  # the bars stay in the log


# --- output permissions ---------------------------------------------------------------------------------
def usual(path):
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if path.is_dir() else 0o666) & ~mask


def test_outputs_get_the_usual_permissions(tmp_path):
    tensors.save(tmp_path / "a.safetensors", {"x": torch.zeros(2)}, {})  # safetensors writes 0600
    with atomic_dir(tmp_path / "folder") as tmp:
        save_file({"x": torch.zeros(2)}, tmp / "model.safetensors")
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "f").write_text("x")
        os.chmod(tmp / "sub" / "f", 0o600)
    for p in (tmp_path / "a.safetensors", tmp_path / "folder", tmp_path / "folder/model.safetensors",
              tmp_path / "folder/sub", tmp_path / "folder/sub/f"):
        assert stat.S_IMODE(p.stat().st_mode) == usual(p), p


def test_job_label_without_wildcards():
    from vlmquant.workflow import job_label

    assert job_label(types.SimpleNamespace(rule="summary", wildcards=[])) == "summary"
