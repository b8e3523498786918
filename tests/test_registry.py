"""A method is one module plus a registry entry (a model family is one adapter file: the workflow runs one added
that way in tests/workflow/test_workflow_families.py)."""
import subprocess
import sys

import pytest
import torch

from conftest import REPO, default_config
from vlmquant.methods import METHODS, Method
from vlmquant.methods.base import EXPERTS_SEARCHES, GROUP_SEARCHES, group_search_of, register_group_search
from vlmquant.search.grid import GroupResult
from vlmquant.spec import RunSpec

UNIT = Method(name="unit", summary="scales of one", settings=("distort",), scales=True)


def rtn_scales(job, spec):
    """A method picking s = 1 everywhere (RTN through the search jobs)."""
    s = torch.ones(job.x.shape[-1], device=job.linears[0].weight.device)
    return GroupResult(scales=s, alpha=0.0, losses=[0.0], best_index=0)


def test_a_method_is_one_module_plus_a_registry_entry(monkeypatch, tmp_path):
    monkeypatch.setitem(METHODS, "unit", UNIT)
    monkeypatch.setattr("vlmquant.methods.base.GROUP_SEARCHES", dict(GROUP_SEARCHES))  # undone after the test
    register_group_search(UNIT)(rtn_scales)
    assert group_search_of(UNIT) is rtn_scales
    spec = RunSpec.from_config("u", {"method": "unit", "w_bit": 4, "distort": True})
    assert spec.has_scales and not spec.needs_grads and spec.config() == {"method": "unit", "w_bit": 4,
                                                                           "w_group": 128, "distort": "reference"}
    with pytest.raises(Exception, match="runs.u.n_grid: unit does not use n_grid"):
        RunSpec.from_config("u", {"method": "unit", "w_bit": 4, "n_grid": 3})
    from vlmquant.workflow import check_config
    cfg = default_config()
    cfg["runs"]["unit-w4"] = {"method": "unit", "w_bit": 4}
    cfg["targets"]["runs"] = ["unit-w4"]
    assert check_config(cfg, REPO / "workflow/schemas/config.schema.yaml")["runs"]["unit-w4"]["method"] == "unit"


def test_every_method_with_scales_registers_its_searches_where_they_are_defined():
    from vlmquant.search import plan  # noqa: F401  (imports the modules whose decorators register the searches)
    from vlmquant.search.experts import search_experts
    from vlmquant.search.grid import search_group
    from vlmquant.search.smooth import smooth_group
    assert {name for name, m in METHODS.items() if m.scales} == set(GROUP_SEARCHES)
    assert GROUP_SEARCHES == {"mbq": search_group, "awq": search_group, "smoothquant": smooth_group}
    assert EXPERTS_SEARCHES == {"mbq": search_experts, "awq": search_experts}


def test_the_workflow_loads_the_method_registry_without_torch():
    code = "import sys, vlmquant.methods, vlmquant.spec; print(sorted(vlmquant.methods.METHODS), 'torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.stdout.split() == ["['awq',", "'gptq',", "'mbq',", "'rtn',", "'smoothquant']", "False"], res.stderr
