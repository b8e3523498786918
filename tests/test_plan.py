"""The plan printed before a run: per stage, job count, time estimated from earlier benchmark files and the largest
memory estimate; the final table."""
import pandas as pd

from vlmquant import paths
from types import SimpleNamespace

from snakemake.common.tbdstring import TBDString

from vlmquant.report.plan import PlannedJob, estimate_seconds, final_table, plan_lines, planned_jobs


def bench(path, seconds):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"s\th:m:s\tmax_rss\n{seconds}\t0:00:01\t100\n")


def test_time_from_the_job_own_benchmark_else_the_median_of_its_stage_for_that_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ids = dict(model="m", calib="c")
    for run, chunk, s in (("mbq", "000", 10.0), ("mbq", "002", 14.0), ("awq", "000", 30.0)):
        bench(tmp_path / paths.BENCHMARKS["search"].format(**ids, run=run, chunk=chunk), s)
    bench(tmp_path / paths.BENCHMARKS["search"].format(model="other", calib="c", run="mbq", chunk="000"), 999.0)

    def job(run, chunk, model="m"):
        wc = dict(model=model, calib="c", run=run, chunk=chunk)
        return PlannedJob("search", wc, 4013, paths.BENCHMARKS["search"].format(**wc))

    assert estimate_seconds(job("mbq", "002")) == 14.0  # its own last run
    assert estimate_seconds(job("new", "000")) == 14.0  # median of 10, 14, 30: the same model only
    assert estimate_seconds(job("new", "000", model="fresh")) is None
    assert estimate_seconds(PlannedJob("merge", ids)) is None  # no benchmark file

    lines = plan_lines([job("mbq", "002"), job("new", "000"), PlannedJob("merge", {**ids, "run": "new"}),
                        PlannedJob("export", {**ids, "run": "new"}, 6144, "results/none.tsv"),
                        job("new", "002", model="fresh")])
    assert lines[0].startswith("vlmquant: 5 jobs to run (estimates:")
    assert lines[1].split() == ["search", "3", "jobs", "~28", "s", "in", "all", "(for", "2", "of", "them),", "up",
                                "to", "4", "GiB", "each"]
    assert lines[2].split() == ["merge", "1", "job"]  # not timed by Snakemake, no memory asked
    assert lines[3].split() == ["export", "1", "job", "time", "unknown", "(first", "run", "here),", "up", "to", "6",
                                "GiB", "each"]


def test_memory_not_known_before_submission_is_left_out():
    """Under a cluster executor Snakemake gives callable resources as "<TBD>" strings in onstart: the plan prints
    no memory for them instead of failing the run."""
    rule = SimpleNamespace(name="search")
    jobs = [SimpleNamespace(rule=rule, output=["x"], wildcards_dict={"model": "m"}, benchmark=None,
                            resources={"mem_mb": mem}) for mem in (TBDString(), 4013, None)]
    workflow = SimpleNamespace(rules=[rule], dag=SimpleNamespace(needrun_jobs=lambda: jobs))
    planned = planned_jobs(workflow)
    assert [j.mem_mb for j in planned] == [None, 4013, None]
    assert plan_lines(planned)[1].split() == ["search", "3", "jobs", "up", "to", "4", "GiB", "each"]


def test_final_table(tmp_path):
    assert final_table(tmp_path / "missing.csv") is None
    pd.DataFrame({"model": ["m", "m"], "calib": [None, "c"], "run": ["fp", "mbq"], "scheme": ["float32", "fp8"],
                  "caption_nll": [2.0, 2.123456], "kl": [0.0, 0.01], "time_total_s": [None, 12.0]}).to_csv(
        tmp_path / "s.csv", index=False)
    lines = final_table(tmp_path / "s.csv").splitlines()
    assert lines[0].split() == ["model", "run", "scheme", "NLL", "KL", "time", "s"]
    assert lines[2].split() == ["m", "mbq", "fp8", "2.123", "0.01", "12"]
