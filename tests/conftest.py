"""Shared fixtures: the demo data and model built once per session, and Snakemake workdirs."""
import contextlib
import copy
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from dry_run import dry_run

REPO = Path(__file__).resolve().parents[1]
# One intra-op thread here and in the processes the tests start, as Snakemake gives its jobs (OMP_NUM_THREADS=1 for
# a rule without `threads`): on 2 shared cores a second thread per process made the demo models' forwards 2.5x
# slower, not faster.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
WORKFLOW_FILES = ("Snakefile", "rules", "scripts", "workflow")
# The tests' copy of the shipped default config.yaml: tests never read the checkout's config.yaml (users edit it)
# or its results/. test_workflow_checks checks the copy against config.yaml as committed.
DEFAULT_CONFIG = REPO / "tests" / "data" / "config.yaml"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    # the tests that run Snakemake (tests/workflow/, the `pipe` fixture) are `slow`, so `-m "not slow"` runs none
    for item in items:
        in_workflow = Path(str(item.fspath)).parent == REPO / "tests" / "workflow"
        if (in_workflow or "pipe" in item.fixturenames) and "slow" not in item.keywords:
            raise pytest.UsageError(f"{item.nodeid}: a test in tests/workflow/ or of the `pipe` fixture must be "
                                    "marked slow")
    pipe_first(items)


# The modules whose tests use the `pipe` fixture: one pytest-xdist worker runs them all and builds the run once
# (pytest_xdist_make_scheduler).
PIPE_MODULES = {f"tests/workflow/{name}.py" for name in (
    "test_eval", "test_export", "test_fp4_workflow", "test_workflow_full", "test_workflow_gptq",
    "test_workflow_report", "test_workflow_search")}
# Modules that mostly wait (test_slurm: on SLURM's status checks), started second, on the other worker, so that they
# wait while the pipe modules run; left to the end, their waiting was the run's last 2 minutes on one worker alone.
WAITING_MODULES = {"tests/workflow/test_slurm.py"}


def module_of(nodeid):
    """'tests/workflow/test_eval.py::test_x[a]' → 'tests/workflow/test_eval.py'."""
    return nodeid.split("::")[0]


def pipe_first(items):
    """Order the tests by xdist scope (xdist_scope): the pipe modules', then WAITING_MODULES', then the other
    modules of tests/workflow/ (Snakemake runs, the longest), then the rest; most tests first within each
    (pytest-xdist's own order), each module in its order, so that the short modules even out the workers' ends.
    A test of the `pipe` fixture elsewhere is a usage error."""
    for item in items:
        if "pipe" in item.fixturenames and module_of(item.nodeid) not in PIPE_MODULES:
            raise pytest.UsageError(f"{item.nodeid}: a module of tests of the `pipe` fixture must be listed in "
                                    "tests/conftest.py PIPE_MODULES")
    count = Counter(xdist_scope(item.nodeid) for item in items)

    def rank(item):
        scope, module = xdist_scope(item.nodeid), module_of(item.nodeid)
        return scope != "pipe", module not in WAITING_MODULES, not module.startswith("tests/workflow/"), -count[scope]

    items.sort(key=rank)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist (`-n 2` in pyproject's addopts) sends each test module whole to one worker, which sets up its
    module and session fixtures once, and the modules of PIPE_MODULES together to one, in the order pipe_first
    gave."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return xdist_scope(nodeid)

    config.option.loadscopereorder = False
    return ByModule(config, log)


def xdist_scope(nodeid):
    """The scope a test runs in on one worker: 'pipe' for PIPE_MODULES, else its module."""
    module = module_of(nodeid)
    return "pipe" if module in PIPE_MODULES else module


def _starts_snakemake(args):
    """Whether a subprocess command line runs Snakemake (`python -m snakemake …` or `snakemake …`)."""
    args = [args] if isinstance(args, (str, os.PathLike)) else list(args)
    words = [str(a) for a in args] if len(args) > 1 else str(args[0]).split()
    return bool(words) and (Path(words[0]).name == "snakemake" or "snakemake" in words[1:3] and "-m" in words[1:3])


@pytest.fixture(autouse=True)
def no_snakemake_unless_slow(request, monkeypatch):
    """A test not marked slow that starts Snakemake fails: Snakemake runs belong in tests/workflow/, marked slow."""
    if "slow" in request.keywords:
        return
    start = subprocess.Popen.__init__

    def refuse(self, args, *a, **kw):
        if _starts_snakemake(args):
            pytest.fail(f"{request.node.nodeid} starts Snakemake: move it to tests/workflow/ and mark it slow")
        start(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


def run_spec(name, ignore=(), **cfg):
    """A RunSpec from `runs.<name>` settings given as keywords (and export.ignore patterns)."""
    from vlmquant.spec import RunSpec

    return RunSpec.from_config(name, cfg, ignore)


SCHEMA = REPO / "workflow/schemas/config.schema.yaml"


def default_config():
    """The default config (DEFAULT_CONFIG), as YAML loads it (unvalidated)."""
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    """The default config, unvalidated, with an empty working directory (tmp_path): its relative paths name
    nothing of the checkout (the demo's outputs are not built there)."""
    monkeypatch.chdir(tmp_path)
    return default_config()


def check(cfg):
    """check_config on a copy of `cfg` against the workflow's schema."""
    from vlmquant.workflow import check_config

    return check_config(copy.deepcopy(cfg), SCHEMA)


def open_demo(path, family="qwen2_vl", device="cpu"):
    """ModelRef of a demo model folder in fp32."""
    from vlmquant.models.loading import open_model

    return open_model({"family": family, "path": str(path), "dtype": "float32"}, device)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """results/demo as the demo rules build it: data/ and model-qwen2_vl/."""
    from vlmquant.demo.dataset import write_demo_data
    from vlmquant.models.tiny import build_demo_model

    root = tmp_path_factory.mktemp("demo")
    write_demo_data(root / "data")
    build_demo_model(root / "model-qwen2_vl", family="qwen2_vl", seed=0)
    return root


@pytest.fixture(scope="session")
def demo_model_path(demo_root):
    return demo_root / "model-qwen2_vl"


@pytest.fixture(scope="session")
def demo_data(demo_root):
    return demo_root / "data"


@pytest.fixture(scope="session")
def family_demo(tmp_path_factory, demo_data):
    """family → (folder, ModelRef) of that family's demo model (fp32, CPU) with calib.parquet (4 COCO samples,
    seed 5) and inputs.safetensors in the folder, each built once per session."""
    from vlmquant.data.calib import build_calib
    from vlmquant.data.inputs import build_inputs
    from vlmquant.models.tiny import build_demo_model

    from test_calib import coco_cfg

    built = {}

    def get(family):
        if family not in built:
            d = tmp_path_factory.mktemp(family)
            model = open_demo(build_demo_model(d / "model", family), family)
            build_calib(coco_cfg(demo_data, n_samples=4, seed=5), d / "calib.parquet")
            build_inputs(d / "calib.parquet", model, d / "inputs.safetensors")
            built[family] = d, model
        return built[family]

    return get


class Workdir:
    """A copy of the workflow in a temporary folder with the default config.yaml, the demo prebuilt under
    results/demo."""

    def __init__(self, path, demo_root):
        self.path = Path(path)
        for name in WORKFLOW_FILES:
            src = REPO / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, self.path / name)
        shutil.copy(DEFAULT_CONFIG, self.path / "config.yaml")
        if demo_root is not None:
            shutil.copytree(demo_root, self.path / "results" / "demo")

    def copy(self, path):
        """A Workdir copying this one into `path`, outputs, times and .snakemake records included: what was run
        here is up to date there."""
        shutil.copytree(self.path, path, symlinks=True, dirs_exist_ok=True)
        other = object.__new__(Workdir)
        other.path = Path(path)
        return other

    @property
    def config(self):
        return yaml.safe_load((self.path / "config.yaml").read_text())

    def set_config(self, cfg):
        (self.path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    def edit(self, fn):
        cfg = self.config
        fn(cfg)
        self.set_config(cfg)

    def snakemake(self, *args, check=True):
        """`snakemake --cores 2 *args` here; a dry run (-n) in a fork of a process that imported Snakemake
        (tests/dry_run.py), with the same output and status."""
        args = ("--cores", "2", *args)
        if "-n" in args:
            res = dry_run(self.path, args, snakemake_env())
        else:
            res = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=self.path, capture_output=True,
                                 text=True, env=snakemake_env())
        if check and res.returncode != 0:
            raise AssertionError(f"snakemake {' '.join(args)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}")
        return res

    def planned(self, *args):
        """{rule: job count} that `snakemake -n` would run."""
        res = self.snakemake("-n", *args)
        return parse_job_stats(res.stdout + res.stderr)

    @contextlib.contextmanager
    def edited_config(self, fn):
        """config.yaml changed by fn(cfg) inside the block, restored byte for byte after."""
        path = self.path / "config.yaml"
        original = path.read_text()
        self.edit(fn)
        try:
            yield
        finally:
            path.write_text(original)

    def file(self, rel):
        return self.path / rel


def snakemake_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def parse_job_stats(text):
    """Parse Snakemake's 'Job stats' table into {rule: count}; {} when nothing is to be done."""
    if "Nothing to be done" in text:
        return {}
    jobs, in_table = {}, False
    for line in text.splitlines():
        if line.startswith("job") and "count" in line:
            in_table = True
            continue
        if in_table:
            m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
            if m and m.group(1) != "total":
                jobs[m.group(1)] = int(m.group(2))
            elif line.strip().startswith("total"):
                break
    if not jobs:
        raise AssertionError(f"no job stats in the dry run output:\n{text[-3000:]}")
    return jobs


@pytest.fixture
def workdir(tmp_path, demo_root):
    return Workdir(tmp_path, demo_root)


@pytest.fixture(scope="session")
def pipe(tmp_path_factory, demo_root):
    """The default workflow run to completion once per session (tests/workflow/e2e_pipeline.py, importable from
    the tests there, the only ones that may use it: slow)."""
    from e2e_pipeline import run_pipeline

    return run_pipeline(tmp_path_factory.mktemp("full_pipeline"), demo_root)


def keep_times(path, write):
    """Rewrite `path` with write(path), then put its access and modification times back (as touch -r, cp -p and
    rsync -a do): Snakemake's file times then see no change."""
    st = os.stat(path)
    write(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
