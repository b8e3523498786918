"""End to end on the demo: an interrupted forced search is completed by the next run (issue 29 item 5), the
summary waits for every checkpoint of its runs, all_runs.csv keeps runs dropped from the targets, and the quiet
profile shows the plan, the jobs' status lines and the final table."""
import shutil

import pandas as pd
import pytest

from e2e_pipeline import CALIB, MODEL, RUNS
from vlmquant import paths

pytestmark = pytest.mark.slow
DOWNSTREAM_OF_EVAL = {"summary": 1, "plots": 1, "all": 1}


def test_interrupted_forced_search_is_completed_by_the_next_run(pipe):
    """Ctrl-C during `--forcerun search`: Snakemake removes the running chunk's folder (an incomplete output) and
    keeps the old scale cache and checkpoints. The next plain run redoes that chunk and everything after it. The
    rerun uses the quiet profile: the plan, each job's status line and the final table, no rule blocks."""
    ids = dict(model=MODEL, calib=CALIB, run="mbq-w3g128")
    shutil.rmtree(pipe / paths.SCALES.format(**ids, chunk="000"))
    assert pipe.planned() == {"search": 1, "merge": 1, "export": 1, "pack": 1, "eval": 1, **DOWNSTREAM_OF_EVAL}
    res = pipe.snakemake("--profile", "workflow/profiles/quiet")
    out = res.stdout + res.stderr
    assert "vlmquant: 7 jobs to run (estimates:" in out
    plan = [line.split()[:2] for line in out.split("vlmquant: 7 jobs to run")[1].splitlines()[1:8]]
    assert plan == [[rule, "1"] for rule in ("search", "merge", "export", "pack", "eval", "summary", "plots")]
    assert "s in all, up to" in out  # search: its time last run, the memory it asks for
    assert f"[search {MODEL}/{CALIB}/mbq-w3g128/000] search: 2/2 [" in out
    assert "localrule" not in out and "rule search:" not in out and "reason:" not in out
    assert "results/summary.csv (every column" in out and "mbq-w3g128" in out.split("results/summary.csv (every")[1]
    assert pipe.planned() == {}
    # an eval table deleted (or removed after an interrupted forced eval) is rebuilt too
    (pipe / paths.EVAL.format(**ids)).unlink()
    assert pipe.planned() == {"eval": 1, **DOWNSTREAM_OF_EVAL}
    pipe.snakemake()


def test_summary_waits_for_pack(pipe):
    """The pack jobs' times are in the summary: it reruns after them, never before."""
    assert pipe.planned("--forcerun", "pack") == {"pack": 3, **DOWNSTREAM_OF_EVAL}
    times = pd.read_csv(pipe / paths.SUMMARY_CSV).set_index("run").time_pack_s
    assert times.drop("fp").gt(0).all()


def test_all_runs_keeps_the_runs_dropped_from_the_targets(pipe):
    with pipe.edited_config(lambda c: c["targets"].update(runs=["rtn-w3g128", "mbq-w3g128"])):
        pipe.snakemake()
        assert list(pd.read_csv(pipe / paths.SUMMARY_CSV).run) == ["fp", "rtn-w3g128", "mbq-w3g128"]
        everything = pd.read_csv(pipe / paths.ALL_RUNS)
        assert sorted(everything.run) == sorted(["fp", *RUNS])
        assert everything.set_index("run").target.to_dict() == {"fp": True, "awq-w3g128": False,
                                                                "mbq-w3g128": True, "rtn-w3g128": True}
        assert pipe.planned() == {}
        # a table of a run outside the targets that goes (or appears, or changes) reruns the summary job only
        awq = pipe / paths.EVAL.format(model=MODEL, calib=CALIB, run="awq-w3g128")
        kept = awq.read_bytes()
        awq.unlink()
        assert pipe.planned() == {"summary": 1, "all": 1, "plots": 1}
        awq.write_bytes(kept)
        assert pipe.planned() == {}
    pipe.snakemake()
    assert pd.read_csv(pipe / paths.ALL_RUNS).target.all()
