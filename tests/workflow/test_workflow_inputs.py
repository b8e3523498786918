"""End to end up to the inputs stage: Snakemake in a temporary folder, determinism, caching."""
import hashlib

import pytest

from vlmquant import paths

pytestmark = pytest.mark.slow
TARGET = paths.INPUTS.format(model="demo-qwen2vl", calib="demo")
OUTPUTS = (paths.CALIB.format(calib="demo"), TARGET)


def digest(wd):
    return {p: hashlib.sha256(wd.file(p).read_bytes()).hexdigest() for p in OUTPUTS}


def test_inputs_from_scratch_cached_and_deterministic(tmp_path_factory):
    from conftest import Workdir

    a = Workdir(tmp_path_factory.mktemp("a"), demo_root=None)  # builds demo data and model itself
    a.snakemake(TARGET)
    assert (a.file(paths.DEMO_MODEL.format(family="qwen2_vl")) / "config.json").is_file()
    first = digest(a)
    assert a.planned(TARGET) == {}  # nothing to do after a run

    # a second clean run gives identical bytes
    b = Workdir(tmp_path_factory.mktemp("b"), demo_root=None)
    b.snakemake(TARGET)
    assert digest(b) == first

    # changing n_samples reruns calib and inputs only
    a.edit(lambda c: c["calib"]["demo"].update(n_samples=5))
    assert a.planned(TARGET) == {"calib": 1, "inputs": 1}
    a.snakemake(TARGET)
    assert digest(a) != first
    assert a.planned(TARGET) == {}


def test_bad_config_fails_before_any_job(workdir):
    workdir.edit(lambda c: c["calib"]["demo"].update(n_samples="many"))
    res = workdir.snakemake("-n", check=False)
    assert res.returncode != 0
    assert "calib.demo.n_samples: 'many' is not of type 'integer'" in res.stdout + res.stderr


def test_bad_input_leaves_no_parquet(workdir):
    import json

    captions = workdir.file(paths.DEMO_FILES["captions_train"])
    raw = json.loads(captions.read_text())
    victim = raw["images"][0]["file_name"]
    workdir.edit(lambda c: c["calib"]["demo"].update(n_samples=len(raw["images"])))
    (workdir.file(paths.DEMO_FILES["images"]) / victim).write_bytes(b"garbage")
    res = workdir.snakemake(paths.CALIB.format(calib="demo"), check=False)
    assert res.returncode != 0
    assert f"error: {workdir.file(paths.DEMO_FILES['images']) / victim}" in res.stderr or \
        f"images/{victim}: not a readable image" in res.stdout + res.stderr
    assert not workdir.file(paths.CALIB.format(calib="demo")).exists()
