"""Config and file edits through Snakemake: each reruns what it invalidates or fails at load with one line.

Snakemake keeps an output whose producing job cannot be resolved (a missing input, an input function
that raises) and reports "Nothing to be done"; these tests hold that no edit is dropped that way.
"""
import shutil

import pytest

from conftest import Workdir, keep_times
from vlmquant import paths

pytestmark = pytest.mark.slow
CALIB = paths.CALIB.format(calib="demo")
ACTS = paths.ACTS.format(model="demo-qwen2vl", calib="demo")
RTN_CHECKPOINT = paths.CHECKPOINT.format(model="demo-qwen2vl", calib="demo", run="rtn-w3g128")


def error_line(res, needle):
    """The output of a failed run holds `needle` on one line."""
    text = res.stdout + res.stderr
    assert res.returncode != 0, text[-3000:]
    (line,) = [line for line in text.splitlines() if needle in line] or [text[-3000:]]
    return line


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["calib"]["demo"].update(captions="results/demo/data/captions_trian.json", n_samples=6),
     "calib.demo.captions: results/demo/data/captions_trian.json not found"),
    (lambda c: c["calib"]["demo-holdout"].update(images="results/demo/data/imgs"),
     "calib.demo-holdout.images: results/demo/data/imgs not found"),
    (lambda c: c["runs"]["awq-w3g128"].update(w_group=48),
     "runs.awq-w3g128.w_group: 48 does not divide hidden_size = 256 of model 'demo-qwen2vl'"),
    (lambda c: c["runs"]["awq-w3g128"].update(w_group=0), "runs.awq-w3g128.w_group: 0 is not supported"),
    (lambda c: c["eval"].update(calib="demo"), "eval.calib: 'demo' is also a search set"),
])
def test_bad_edit_after_a_run_fails_at_load(workdir, edit, needle):
    """The demo's outputs exist (as after a run): the edit still fails, before any job, naming key and path."""
    workdir.edit(edit)
    error_line(workdir.snakemake("-n", check=False), needle)


def test_yaml_syntax_error_names_the_line(workdir):
    path = workdir.file("config.yaml")
    lines = path.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if line.strip().startswith("n_samples: 8"))
    lines[n] = lines[n].replace("n_samples: 8", "n_samples: 8: 9")
    path.write_text("\n".join(lines) + "\n")
    line = error_line(workdir.snakemake("-n", check=False), "config.yaml: line")
    column = lines[n].index(": 9") + 1
    assert line == f"config.yaml: line {n + 1}, column {column}: mapping values are not allowed here (YAML syntax)"


@pytest.fixture(scope="module")
def user_data_dir(tmp_path_factory, demo_root):
    """A workdir whose calibration sets read a copy of the demo data at a user path (data/)."""
    wd = Workdir(tmp_path_factory.mktemp("user_data"), demo_root)
    shutil.copytree(demo_root / "data", wd.file("data"))

    def edit(c):
        for name, split in (("demo", "train"), ("demo-holdout", "val")):
            c["calib"][name].update(captions=f"data/captions_{split}.json", images="data/images")
        del c["calib"]["demo"]["text"]
    wd.edit(edit)
    wd.snakemake(CALIB)
    return wd


def used_and_unused(wd):
    import pyarrow.parquet as pq

    used = {f for row in pq.read_table(wd.file(CALIB), columns=["file_names"]).to_pylist() for f in row["file_names"]}
    every = {p.name for p in wd.file("data/images").iterdir()}
    return sorted(used), sorted(every - used)


def test_calib_reruns_when_an_image_it_uses_changes(user_data_dir):
    wd = user_data_dir
    assert wd.planned(CALIB) == {}
    used, unused = used_and_unused(wd)
    assert len(used) == 8 and unused
    images = wd.file("data/images")
    shutil.copyfile(images / unused[0], images / f"{unused[0]}.bak")  # another file in the folder: nothing
    assert wd.planned(CALIB) == {}
    original = (images / used[0]).read_bytes()
    shutil.copyfile(images / unused[0], images / used[0])  # rewritten in place: the folder's time is unchanged
    try:
        assert wd.planned(CALIB) == {"calib": 1}
    finally:
        (images / used[0]).write_bytes(original)
        wd.snakemake(CALIB)
    assert wd.planned(CALIB) == {}


def test_calib_reruns_for_another_image_folder_or_captions_file(user_data_dir):
    wd = user_data_dir
    shutil.copytree(wd.file("data/images"), wd.file("data/images2"), dirs_exist_ok=True)
    shutil.copy(wd.file("data/captions_train.json"), wd.file("data/captions_copy.json"))
    for edit in (lambda c: c["calib"]["demo"].update(images="data/images2"),
                 lambda c: c["calib"]["demo"].update(captions="data/captions_copy.json"),
                 lambda c: c["calib"]["demo"].update(n_samples=6)):
        with wd.edited_config(edit):
            assert wd.planned(CALIB) == {"calib": 1}
    assert wd.planned(CALIB) == {}


@pytest.fixture(scope="module")
def user_model(tmp_path_factory, demo_root):
    """A workdir whose model is a copy of the demo model at a user path (models/tiny), with the fp inputs of the
    search (acts) and the RTN checkpoint built; and the weights of another demo model of the same shapes (seed 1).
    The tests edit copies of the workdir."""
    from vlmquant.models.tiny import build_demo_model

    wd = Workdir(tmp_path_factory.mktemp("user_model"), demo_root)
    shutil.copytree(demo_root / "model-qwen2_vl", wd.file("models/tiny"))
    wd.edit(lambda c: c["models"]["demo-qwen2vl"].update(path="models/tiny"))
    wd.snakemake(ACTS, RTN_CHECKPOINT)
    other = build_demo_model(tmp_path_factory.mktemp("other"), seed=1) / "model.safetensors"
    return wd, other


def test_model_files_changed_in_place_rerun_the_jobs_that_read_them(user_model, tmp_path):
    """A user model folder: new weights of the same shapes rerun acts, not inputs; a tokenizer file reruns both,
    and so does the calib set's `labels`."""
    wd, other = user_model[0].copy(tmp_path), user_model[1]
    assert wd.planned(ACTS) == {}
    shutil.copyfile(other, wd.file("models/tiny/model.safetensors"))  # in place
    assert wd.planned(ACTS) == {"acts": 1}
    wd.snakemake(ACTS)
    tokenizer = wd.file("models/tiny/tokenizer_config.json")
    tokenizer.write_text(tokenizer.read_text() + "\n")  # Snakemake compares small files' checksums too
    assert wd.planned(ACTS) == {"inputs": 1, "acts": 1}
    wd.snakemake(ACTS)
    with wd.edited_config(lambda c: c["calib"]["demo"].update(labels="turn")):  # the model inputs, not the Parquet
        assert wd.planned(ACTS) == {"inputs": 1, "acts": 1}


def test_calib_reruns_when_an_image_is_replaced_with_its_times_kept(user_data_dir):
    """Same size, same modification time (touch -r, rsync -a): only the content fingerprint sees the change."""
    wd = user_data_dir
    used, _ = used_and_unused(wd)
    image = wd.file("data/images") / used[1]
    original = image.read_bytes()
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0xFF
    keep_times(image, lambda p: p.write_bytes(bytes(changed)))
    try:
        assert wd.planned(CALIB) == {"calib": 1}
    finally:
        keep_times(image, lambda p: p.write_bytes(original))
    assert wd.planned(CALIB) == {}  # the same content again: nothing to do


def test_model_files_replaced_with_their_times_kept_rerun_exactly_what_reads_them(user_model, tmp_path):
    """A user model folder, the fp inputs of the search (acts) and the RTN checkpoint built: other weights of the
    same size with the old times rerun acts and export, not inputs; a same-size chat template edit reruns inputs,
    acts and export (every job that reads it)."""
    wd, other = user_model[0].copy(tmp_path), user_model[1]
    targets = [ACTS, RTN_CHECKPOINT]
    assert wd.planned(*targets) == {}
    weights = wd.file("models/tiny/model.safetensors")
    assert other.stat().st_size == weights.stat().st_size
    keep_times(weights, lambda p: shutil.copyfile(other, p))
    assert wd.planned(*targets) == {"acts": 1, "export": 1}
    wd.snakemake(*targets)
    template = wd.file("models/tiny/chat_template.jinja")
    keep_times(template, lambda p: p.write_text(p.read_text().replace("helpful", "careful")))
    assert wd.planned(*targets) == {"inputs": 1, "acts": 1, "export": 1}


def break_nan(folder):
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, :2] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def truncate(folder):
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)


@pytest.mark.parametrize("damage, needle", [
    (break_nan, "models/tiny/model.safetensors: tensor model.layers.1.mlp.down_proj.weight has 2 non-finite values"),
    (lambda d: (d / "tokenizer.json").unlink(), "config.yaml: line 9: models.demo-qwen2vl.path: models/tiny: no tokenizer"),
    (truncate, "config.yaml: line 9: models.demo-qwen2vl.path: models/tiny/model.safetensors: safetensors shard is"),
])
def test_broken_model_folder_fails_at_load(workdir, demo_root, damage, needle):
    """NaN weights, no tokenizer file, a truncated shard: one line naming the file, before any job, located at
    the config.yaml line that sets the model's path."""
    shutil.copytree(demo_root / "model-qwen2_vl", workdir.file("models/tiny"))
    damage(workdir.file("models/tiny"))
    workdir.edit(lambda c: c["models"]["demo-qwen2vl"].update(path="models/tiny"))
    line = error_line(workdir.snakemake("-n", check=False), needle)
    assert needle in line  # error_line falls back to the output
    assert line.startswith("config.yaml: line ") and ": models.demo-qwen2vl.path: models/tiny" in line
