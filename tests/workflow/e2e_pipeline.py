"""The default (demo) workflow run end to end, shared by the tests of tests/workflow/ through conftest's `pipe`
fixture: once per session, a copy of the workflow in a temporary folder (with the demo data and model prebuilt
by conftest's `demo_root`) runs `snakemake --cores 2`. The tests read its outputs; a test that edits its config
or reruns a job puts it back as it was (Workdir.edited_config, `planned() == {}` at its end)."""
from conftest import Workdir
from vlmquant import paths

MODEL = "demo-qwen2vl"
CALIB = "demo"
EVAL_CALIB = "demo-holdout"
RUNS = ("rtn-w3g128", "awq-w3g128", "mbq-w3g128")


class Pipeline(Workdir):
    """A Workdir with the default workflow run to completion, and the paths tests look at."""

    def __truediv__(self, rel):
        return self.path / rel

    def run_dir(self, run):
        return self.path / paths.RUN.format(model=MODEL, calib=CALIB, run=run)

    @property
    def model_dir(self):
        return self.path / paths.DEMO_MODEL.format(family="qwen2_vl")

    @property
    def eval_inputs(self):
        return self.path / paths.INPUTS.format(model=MODEL, calib=EVAL_CALIB)

    @property
    def fp_ref(self):
        return self.path / paths.FP_REF.format(model=MODEL, eval_calib=EVAL_CALIB)


def run_pipeline(path, demo_root):
    """The default workflow run to completion in `path`; its terminal output in `first_run`, the files of each run's
    folder then in `default_files` ({run: names}), the summary.csv text in `default_summary`. Then with the pseudo checkpoints too (export.formats both: the
    tests of checkpoint/ read them), that run's output in `pseudo_run`: the config the tests see."""
    pipe = Pipeline(path, demo_root)
    pipe.first_run = pipe.snakemake()
    pipe.default_files = {run: sorted(p.name for p in pipe.run_dir(run).iterdir()) for run in RUNS}
    pipe.default_summary = (pipe / paths.SUMMARY_CSV).read_text()
    pipe.edit(lambda c: c["export"].update(formats=["pseudo", "compressed-tensors"]))
    pipe.pseudo_run = pipe.snakemake()
    return pipe
