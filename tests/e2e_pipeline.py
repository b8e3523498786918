"""One end-to-end run of the default (demo) workflow, shared by test_export, test_eval and test_workflow_full.

`full_run()` copies the workflow into a temporary folder (with the demo data and model prebuilt by
conftest's `demo_root`) and runs `snakemake --cores 2` there once per pytest process.
"""
import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "rules", "scripts", "workflow", "config.yaml")
MODEL = "demo-qwen2vl"
CALIB = "demo"
EVAL_CALIB = "demo-holdout"
RUNS = ("rtn-w3g128", "awq-w3g128", "mbq-w3g128")
_RUNS = {}


def env():
    out = dict(os.environ)
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    out.setdefault("HF_HUB_OFFLINE", "1")
    return out


class Pipeline:
    def __init__(self, path):
        self.path = Path(path)

    def __truediv__(self, rel):
        return self.path / rel

    def run_dir(self, run):
        return self.path / f"results/{MODEL}/{CALIB}/{run}"

    @property
    def model_dir(self):
        return self.path / "results/demo/model-qwen2_vl"

    @property
    def eval_inputs(self):
        return self.path / f"results/{MODEL}/{EVAL_CALIB}/inputs.safetensors"

    @property
    def fp_ref(self):
        return self.path / f"results/{MODEL}/eval-{EVAL_CALIB}/fp.safetensors"

    @property
    def config(self):
        return yaml.safe_load((self.path / "config.yaml").read_text())

    def snakemake(self, *args, check=True):
        cmd = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
        res = subprocess.run(cmd, cwd=self.path, capture_output=True, text=True, env=env())
        if check and res.returncode != 0:
            raise AssertionError(f"snakemake {' '.join(args)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}")
        return res

    def planned(self, *args):
        """{rule: job count} that `snakemake -n` would run."""
        res = self.snakemake("-n", *args)
        return job_stats(res.stdout + res.stderr)

    @contextlib.contextmanager
    def edited_config(self, fn):
        """config.yaml changed by fn(cfg) inside the block, restored byte for byte after."""
        path = self.path / "config.yaml"
        original = path.read_text()
        cfg = yaml.safe_load(original)
        fn(cfg)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        try:
            yield
        finally:
            path.write_text(original)


def job_stats(text):
    """Snakemake's 'Job stats' table as {rule: count}; {} when nothing is to be done."""
    if "Nothing to be done" in text:
        return {}
    jobs, in_table = {}, False
    for line in text.splitlines():
        if line.startswith("job") and "count" in line:
            in_table = True
        elif in_table:
            m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
            if m and m.group(1) != "total":
                jobs[m.group(1)] = int(m.group(2))
            elif line.strip().startswith("total"):
                break
    if not jobs:
        raise AssertionError(f"no job stats in the dry run output:\n{text[-3000:]}")
    return jobs


def full_run(tmp_path_factory, demo_root):
    """The default workflow run to completion (once per process); returns a Pipeline."""
    if "default" not in _RUNS:
        root = tmp_path_factory.mktemp("full_pipeline")
        for name in WORKFLOW_FILES:
            src = REPO / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
        shutil.copytree(demo_root, root / "results" / "demo")
        pipe = Pipeline(root)
        pipe.snakemake()
        _RUNS["default"] = pipe
    return _RUNS["default"]
