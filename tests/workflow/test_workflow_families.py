"""A model family added as one file runs the workflow (vlmquant/models/families/), and a mixture-of-experts
family runs it with per-expert rows and packed experts."""
import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO, Workdir, snakemake_env
from vlmquant import paths

pytestmark = pytest.mark.slow

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


def test_a_family_is_one_file(tmp_path, demo_root):
    """The package with one file added under models/families/ runs the workflow on that family's demo
    model, with the family read from the model folder's name: nothing else lists it."""
    package = tmp_path / "pkg"
    shutil.copytree(REPO / "vlmquant", package / "vlmquant", ignore=shutil.ignore_patterns("__pycache__"))
    (package / "vlmquant/models/families/vipllava.py").write_text(VIPLLAVA)
    (tmp_path / "wd").mkdir()
    wd = Workdir(tmp_path / "wd", demo_root)
    wd.edit(lambda c: (c["models"].update({"demo-vip": {"path": paths.DEMO_MODEL.format(family="vipllava")}}),
                       c["runs"]["awq-w3g128"].update(formats=["pseudo"]),
                       c["targets"].update(models=["demo-vip"], runs=["awq-w3g128"])))
    env = {**snakemake_env(), "PYTHONPATH": str(package)}
    res = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2"], cwd=wd.path, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = pd.read_csv(wd.file(paths.SUMMARY_CSV))
    assert summary.run.tolist() == ["fp", "awq-w3g128"] and set(summary.model) == {"demo-vip"}
    assert summary.kl[1] > 0
    # without the file, the same config is one line naming the families that exist
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n"], cwd=wd.path, env=snakemake_env(),
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert "models.demo-vip.path: results/demo/model-vipllava has model_type 'vipllava'" in res.stdout + res.stderr


@pytest.fixture(scope="module")
def moe(tmp_path_factory, demo_root):
    """A workflow with the Qwen3-VL-MoE demo model as demo-moe; the tests below run one run each in it, sharing
    its demo model, calib, inputs, grads, acts and fp eval."""
    wd = Workdir(tmp_path_factory.mktemp("moe"), demo_root)
    wd.edit(lambda c: c["models"].update({"demo-moe": {"path": paths.DEMO_MODEL.format(family="qwen3_vl_moe")}}))
    return wd


def test_a_mixture_of_experts_family_runs_the_workflow(moe):
    """Qwen3-VL-MoE (deepstack, MoE layers and a dense one) through Snakemake: grads, acts, two search chunks,
    merge, the packed checkpoint, eval and the summary, with the per-expert rows in the search table."""
    workdir = moe
    workdir.edit(lambda c: c["targets"].update(models=["demo-moe"], runs=["mbq-w3g128"]))
    workdir.snakemake()
    summary = pd.read_csv(workdir.file(paths.SUMMARY_CSV))
    assert summary.run.tolist() == ["fp", "mbq-w3g128"] and set(summary.model) == {"demo-moe"}
    assert summary.kl[1] > 0
    run = workdir.file(paths.RUN.format(model="demo-moe", calib="demo", run="mbq-w3g128"))
    table = pd.read_parquet(run / "search.parquet")
    experts = table[table.expert.notna()]
    assert len(experts) == 3 * 8 and (experts.tokens > 0).all() and set(experts.layer) == {0, 1, 2}
    packed = json.loads((run / "packed" / "quantization.json").read_text())
    assert len(packed["packed_experts"]) == 6


def test_an_mbq_w4a8_run_on_a_mixture_of_experts_model_runs_every_stage(moe):
    """Qwen3-VL-MoE, MBQ W4A8 through Snakemake: grads, acts, search (experts searched with their routed tokens'
    inputs quantized), merge, the eval with activations quantized at run time, the pseudo checkpoint and packed/
    with every expert per expert, equal to the pseudo checkpoint tensor for tensor."""
    import torch
    from safetensors.torch import load_file
    from test_moe_packed import assert_no_fused_experts, decompressed, in_pseudo_layout

    from vlmquant.models import get_adapter

    workdir = moe
    workdir.edit(lambda c: (c["export"].update(formats=["pseudo", "compressed-tensors"]),
                            c["targets"].update(models=["demo-moe"], runs=["mbq-w4a8"])))
    workdir.snakemake()
    summary = pd.read_csv(workdir.file("results/summary.csv"))
    assert summary.run.tolist() == ["fp", "mbq-w4a8"] and summary.kl[1] > 0
    run = workdir.file("results/demo-moe/demo/mbq-w4a8")
    table = pd.read_parquet(run / "search.parquet")
    experts = table[table.expert.notna()]
    assert len(experts) == 3 * 8 and (experts.tokens > 0).all()
    packed = run / "packed"
    info = json.loads((packed / "quantization.json").read_text())
    assert info["scheme"]["a_bit"] == 8 and len(info["packed_experts"]) == 6
    assert_no_fused_experts(packed, 8, 3)
    reference = {k: v for f in (run / "checkpoint").glob("model*.safetensors") for k, v in load_file(f).items()}
    dense = in_pseudo_layout(decompressed(packed), reference, get_adapter("qwen3_vl_moe"))
    assert [k for k in reference if not torch.equal(dense[k], reference[k])] == []
