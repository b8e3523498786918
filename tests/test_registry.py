"""A model family is one adapter file; a method is one module plus a registry entry."""
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import REPO, Workdir, default_config, snakemake_env
from vlmquant.methods import METHODS, Method
from vlmquant.methods.base import EXPERTS_SEARCHES, GROUP_SEARCHES, group_search_of, register_group_search
from vlmquant.search.grid import GroupResult
from vlmquant.spec import RunSpec

# The whole of a new family: VipLLaVA (CLIP features of several layers, projected into a Llama decoder).
VIPLLAVA = '''"""VipLLaVA: CLIP features of several vision layers, projected into a Llama decoder."""
import transformers

from vlmquant.models.base import Adapter
from vlmquant.models.families.llava import LLAVA_LAYER_PREFIXES, LLAVA_TEMPLATE
from vlmquant.models.tiny import TEXT_SIZES, VISION_SIZES, make_tokenizer


class VipLlava(Adapter):
    model_class = "VipLlavaForConditionalGeneration"
    processor_class = "LlavaProcessor"
    checkpoint_layer_prefixes = LLAVA_LAYER_PREFIXES

    def demo(self):
        tokenizer = make_tokenizer(("<s>", "</s>", "<pad>", "<image>"), bos="<s>", eos="</s>", pad="<pad>")
        config = transformers.VipLlavaConfig(
            vision_config=transformers.CLIPVisionConfig(**VISION_SIZES, image_size=112, patch_size=14),
            text_config=transformers.LlamaConfig(vocab_size=len(tokenizer), **TEXT_SIZES,
                                                 bos_token_id=tokenizer.bos_token_id,
                                                 eos_token_id=tokenizer.eos_token_id,
                                                 pad_token_id=tokenizer.pad_token_id),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layers=[-2, -1],
            tie_word_embeddings=False)
        image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 112},
                                                             crop_size={"height": 112, "width": 112})
        processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                                vision_feature_select_strategy="full", chat_template=LLAVA_TEMPLATE)
        return config, processor


ADAPTER = VipLlava()
'''


@pytest.mark.slow
def test_a_family_is_one_file(tmp_path, demo_root):
    """The package with one file added under models/families/ runs the workflow on that family's demo
    model, with the family read from the model folder's name: nothing else lists it."""
    package = tmp_path / "pkg"
    shutil.copytree(REPO / "vlmquant", package / "vlmquant", ignore=shutil.ignore_patterns("__pycache__"))
    (package / "vlmquant/models/families/vipllava.py").write_text(VIPLLAVA)
    (tmp_path / "wd").mkdir()
    wd = Workdir(tmp_path / "wd", demo_root)
    wd.edit(lambda c: (c["models"].update({"demo-vip": {"path": "results/demo/model-vipllava"}}),
                       c["runs"]["awq-w3g128"].update(formats=["pseudo"]),
                       c["targets"].update(models=["demo-vip"], runs=["awq-w3g128"])))
    env = {**snakemake_env(), "PYTHONPATH": str(package)}
    res = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2"], cwd=wd.path, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = pd.read_csv(wd.file("results/summary.csv"))
    assert summary.run.tolist() == ["fp", "awq-w3g128"] and set(summary.model) == {"demo-vip"}
    assert summary.kl[1] > 0
    # without the file, the same config is one line naming the families that exist
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n"], cwd=wd.path, env=snakemake_env(),
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert "models.demo-vip.path: results/demo/model-vipllava has model_type 'vipllava'" in res.stdout + res.stderr


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
