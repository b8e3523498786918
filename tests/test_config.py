"""Config validation: schema errors name the key; defaults are filled; names are cross-checked."""
import subprocess

import pytest

from vlmquant.errors import VlmquantError
from vlmquant.workflow import calib_params, targets

from conftest import DEFAULT_CONFIG, REPO, check


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
