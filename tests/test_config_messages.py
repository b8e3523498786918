"""What the workflow says about the config: a config error as one line at its file and YAML line with "did you
mean", names that become folders restricted, one note per setting that changes what is written (through Snakemake, and
a run stopped by SIGTERM: tests/workflow/test_workflow_messages.py)."""
import pytest

from conftest import check
from vlmquant.workflow.checks import key_line, locate, notes
from vlmquant.errors import VlmquantError


def error(cfg):
    with pytest.raises(VlmquantError) as e:
        check(cfg)
    return str(e.value)


# --- one line per error ---------------------------------------------------------------------------
@pytest.mark.parametrize("edit, line", [
    (lambda c: c["calib"]["demo"].update(n_sample=8), "config: calib.demo.n_sample: unknown key (did you mean n_samples?)"),
    (lambda c: c["runs"]["mbq-w3g128"].update(w_grp=64), "config: runs.mbq-w3g128.w_grp: unknown key (did you mean w_group?)"),
    (lambda c: c.update(target={}), "config: target: unknown key (did you mean targets?)"),
    (lambda c: c["runs"]["awq-w3g128"].update(method="mqb"),
     "config: runs.awq-w3g128.method: 'mqb' is not one of ['awq', 'gptq', 'mbq', 'rtn', 'smoothquant'] (did you mean mbq?)"),
    (lambda c: c["eval"].update(xyz=1), "config: eval.xyz: unknown key"),  # nothing close: no suggestion
])
def test_misspelled_key_or_choice_gets_the_closest(cfg, edit, line):
    edit(cfg)
    assert error(cfg) == line


@pytest.mark.parametrize("kind, name", [("runs", "my run/w4"), ("runs", "../w4"), ("models", "a:b"), ("calib", ".demo")])
def test_names_that_become_folders_are_restricted(cfg, kind, name):
    cfg[kind][name] = next(iter(cfg[kind].values()))
    assert error(cfg) == (f"config: {kind}.{name}: names become folder names: use letters, digits and - _ . only, "
                          "starting with a letter or digit")


def test_names_with_dots_dashes_and_underscores_pass(cfg):
    cfg["runs"]["rtn_w4.g64-b"] = {"method": "rtn", "w_bit": 4, "w_group": 64}
    assert check(cfg)["runs"]["rtn_w4.g64-b"]["w_group"] == 64


def test_error_points_at_the_file_and_line_that_set_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files under the working directory are shown relative to it
    base, extra = tmp_path / "config.yaml", tmp_path / "extra.yaml"
    base.write_text("runs:\n  w4.5:\n    method: rtn\n    w_bit: 4\n")
    extra.write_text("# override\nruns:\n  w4.5: {method: rtn,\n    w_bit: 5}\n")
    assert key_line(base, "runs.w4.5.w_bit") == (True, 3, 4)  # a name with a dot: the longest key that fits
    assert key_line(base, "runs.w4.5.w_group") == (False, 2, 2)  # missing key: its run's line
    assert key_line(tmp_path / "absent.yaml", "runs") == (False, 0, None)
    files = [str(base), str(extra)]  # rising precedence
    assert locate("config: runs.w4.5.w_bit: 5 bits", files) == "extra.yaml: line 4: runs.w4.5.w_bit: 5 bits"
    assert locate("config: runs.w4.5.method: bad", files[:1]) == "config.yaml: line 3: runs.w4.5.method: bad"
    assert locate("config: runs.w4.5.w_bit: x", files, {"runs": {"w4.5": {"w_bit": 5}}}) == "--config: runs.w4.5.w_bit: x"
    listed = tmp_path / "listed.yaml"  # list items: the schema's messages name them by index
    listed.write_text("export:\n  formats:\n    - compressed-tensors\n    - bogus\n")
    assert key_line(listed, "export.formats.1") == (True, 3, 4)
    assert locate("config: export.formats.0: x", files, {"export": {"formats": ["bogus"]}}) == (
        "--config: export.formats.0: x")
    assert locate("config: (top level): 'models' is a required property", files) == (
        "extra.yaml: (top level): 'models' is a required property")
    assert locate("calib.parquet: not a calibration table", files) == "calib.parquet: not a calibration table"


# --- notes --------------------------------------------------------------------------------------------
def test_a_run_without_packed_form_is_noted_once(cfg):
    assert notes(check(cfg)) == []
    cfg["runs"]["rtn-w5"] = {"method": "rtn", "w_bit": 5}
    cfg["targets"]["runs"] = ["rtn-w5", "rtn-w3g128"]
    assert notes(check(cfg)) == ["note: runs.rtn-w5: writes checkpoint/ (pseudo) only, no packed/: weight-only packed "
                                 "export supports w_bit 3 (experimental), 4 or 8; export other widths as pseudo (set "
                                 "formats: [pseudo] to drop this note)"]
    cfg["runs"]["rtn-w5"]["formats"] = ["pseudo"]  # asked for: nothing to say
    assert notes(check(cfg)) == []
