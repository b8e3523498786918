"""The marks hold: a test not marked slow that starts Snakemake fails (conftest's guard), and every test of
tests/workflow/ is marked slow, so `pytest -m "not slow"` runs no Snakemake."""
import ast
import subprocess
import sys

import pytest

from conftest import REPO, _starts_snakemake, group_for_xdist


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
    """The parts of a pytest item that group_for_xdist reads and writes."""

    def __init__(self, nodeid, fixtures, groups=()):
        self.nodeid, self.fixturenames = nodeid, list(fixtures)
        self.marks = [pytest.mark.xdist_group(g).mark for g in groups]

    def iter_markers(self, name):
        return (m for m in self.marks if m.name == name)

    def add_marker(self, mark):
        self.marks.append(mark.mark)


def test_xdist_groups_are_the_modules_and_pipe():
    items = [Item("tests/test_a.py::test_x", ["tmp_path"]), Item("tests/test_a.py::test_y", []),
             Item("tests/workflow/test_b.py::test_z", ["pipe"], ["pipe"]),
             Item("tests/workflow/test_b.py::test_w", ["workdir"], ["pipe"])]
    group_for_xdist(items)
    assert [[m.args[0] for m in i.iter_markers("xdist_group")] for i in items] == [
        ["tests/test_a.py"], ["tests/test_a.py"], ["pipe"], ["pipe"]]
    with pytest.raises(pytest.UsageError, match=r"test_c.py::test_v: a test of the `pipe` fixture must be in its xdist"):
        group_for_xdist([Item("tests/workflow/test_c.py::test_v", ["pipe"])])
