"""One end-to-end run of the default (demo) workflow, shared by test_export, test_eval and test_workflow_full.

`full_run()` copies the workflow into a temporary folder (with the demo data and model prebuilt by
conftest's `demo_root`) and runs `snakemake --cores 2` there once per pytest process.
"""
from conftest import Workdir

MODEL = "demo-qwen2vl"
CALIB = "demo"
EVAL_CALIB = "demo-holdout"
RUNS = ("rtn-w3g128", "awq-w3g128", "mbq-w3g128")
_RUNS = {}


class Pipeline(Workdir):
    """A Workdir with the default workflow run to completion, and the paths tests look at."""

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


def full_run(tmp_path_factory, demo_root):
    """The default workflow run to completion (once per process); returns a Pipeline."""
    if "default" not in _RUNS:
        pipe = Pipeline(tmp_path_factory.mktemp("full_pipeline"), demo_root)
        pipe.first_run = pipe.snakemake()  # its terminal output (stdout, stderr)
        _RUNS["default"] = pipe
    return _RUNS["default"]
