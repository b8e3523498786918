"""End to end: GPTQ alone and MBQ + GPTQ through every stage of the workflow to packed checkpoints (issue 26)."""
import pandas as pd
import pytest

from vlmquant.io.scales import load_cache

pytestmark = pytest.mark.slow
RUNS = ("gptq-w3g128", "mbq-gptq-w3g128")


def test_gptq_runs_go_through_every_stage_to_packed(pipe, tmp_path):
    workdir = pipe.copy(tmp_path)  # calib, inputs, grads, acts and the fp eval done
    # pipe's config asks for the pseudo checkpoints too (e2e_pipeline): back to the default formats
    workdir.edit(lambda cfg: (cfg["targets"].update(runs=list(RUNS)), cfg["export"].update(formats=["compressed-tensors"])))
    planned = workdir.planned("--forceall")
    assert planned["search"] == 2 * 2 and planned["grads"] == 1  # 4 layers in chunks of 2; only mbq needs ρ
    workdir.snakemake()
    for run in RUNS:
        base = workdir.file(f"results/demo-qwen2vl/demo/{run}")
        cache = load_cache(base / "scale_cache.pt")
        assert len(cache["gptq"]) == 4 * 7 and bool(cache["scale"]) == run.startswith("mbq")
        assert (base / "packed" / "config.json").is_file() and not (base / "checkpoint").exists()  # export.formats
        table = pd.read_parquet(base / "search.parquet")
        gptq = table[table.group == "gptq"]
        assert len(gptq) == 28 and (gptq.loss <= gptq.rtn_loss).all()
        if run.startswith("mbq"):
            assert gptq.ratio.notna().all()  # the modality Hessian's ρ
    summary = pd.read_csv(workdir.file("results/summary.csv"))
    assert set(RUNS) <= set(summary["run"])
