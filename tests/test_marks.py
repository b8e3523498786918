"""The marks hold: a test not marked slow that starts Snakemake fails (conftest's guard), and every test of
tests/workflow/ is marked slow, so `pytest -m "not slow"` runs no Snakemake."""
import ast
import subprocess
import sys

import pytest

from conftest import REPO, _starts_snakemake, pipe_first, xdist_scope


@pytest.mark.parametrize("args, starts", [
    ([sys.executable, "-m", "snakemake", "--cores", "2"], True), (["snakemake", "-n"], True),
    ("/usr/bin/snakemake -n", True), ("python -m snakemake", True),
    ([sys.executable, "-c", "print('snakemake')"], False),
    (["git", "show", "HEAD:config.yaml"], False), (["bash", "slurm-up.sh"], False),
])
def test_what_starts_snakemake(args, starts):
    assert _starts_snakemake(args) is starts


def test_a_not_slow_test_that_starts_snakemake_fails():
    with pytest.raises(pytest.fail.Exception, match="starts Snakemake: move it to tests/workflow/ and mark it slow"):
        subprocess.run([sys.executable, "-m", "snakemake", "--version"], capture_output=True)
    assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True, text=True).stdout == "1\n"


@pytest.mark.parametrize("path", sorted((REPO / "tests" / "workflow").glob("test_*.py")), ids=lambda p: p.name)
def test_every_workflow_test_file_is_marked_slow(path):
    marks = [node for node in ast.parse(path.read_text()).body if isinstance(node, ast.Assign)
             and any(getattr(t, "id", None) == "pytestmark" for t in node.targets)]
    assert marks and "slow" in ast.unparse(marks[0].value), f"{path.name}: set pytestmark = pytest.mark.slow"



class Item:
    """The parts of a pytest item that pipe_first reads."""

    def __init__(self, nodeid, fixtures=()):
        self.nodeid, self.fixturenames = nodeid, list(fixtures)


def test_pipe_modules_first_on_one_worker_then_slurm_the_workflow_modules_and_the_rest_most_tests_first():
    items = [Item("tests/test_a.py::test_x"), Item("tests/workflow/test_eval.py::test_y", ["pipe"]),
             Item("tests/test_b.py::test_u"), Item("tests/workflow/test_slurm.py::test_s"),
             Item("tests/test_a.py::test_z[a::b]"), Item("tests/workflow/test_workflow_search.py::test_w"),
             Item("tests/workflow/test_workflow_edits.py::test_e")]
    pipe_first(items)
    assert [i.nodeid for i in items] == [
        "tests/workflow/test_eval.py::test_y", "tests/workflow/test_workflow_search.py::test_w",
        "tests/workflow/test_slurm.py::test_s", "tests/workflow/test_workflow_edits.py::test_e",
        "tests/test_a.py::test_x", "tests/test_a.py::test_z[a::b]", "tests/test_b.py::test_u"]
    assert [xdist_scope(i.nodeid) for i in items] == [
        "pipe", "pipe", "tests/workflow/test_slurm.py", "tests/workflow/test_workflow_edits.py", "tests/test_a.py",
        "tests/test_a.py", "tests/test_b.py"]
    with pytest.raises(pytest.UsageError, match=r"test_c.py::test_v: a module of tests of the `pipe` fixture must be"):
        pipe_first([Item("tests/workflow/test_c.py::test_v", ["pipe"])])
