"""Model inputs: processor tensors, masks checked against the processor's own tokens, packing."""
import pytest
import torch
import transformers

from vlmquant.data.calib import build_calib, read_calib
from vlmquant.data.inputs import build_inputs
from vlmquant.errors import VlmquantError
from vlmquant.io import ragged
from vlmquant.models import get_adapter

from conftest import open_demo
from test_calib import coco_cfg


@pytest.fixture(scope="module")
def encoded(demo_data, demo_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inputs")
    build_calib(coco_cfg(demo_data, format="few_shot", n_samples=3), tmp / "c.parquet")
    build_inputs(tmp / "c.parquet", open_demo(demo_model_path), tmp / "inputs.safetensors")
    packed, meta = ragged.load(tmp / "inputs.safetensors")
    return read_calib(tmp / "c.parquet"), packed, meta


def test_masks_match_processor_tokens(encoded, demo_model_path):
    rows, packed, meta = encoded
    adapter = get_adapter("qwen2_vl")
    processor = adapter.load_processor(demo_model_path)
    config = transformers.AutoConfig.from_pretrained(demo_model_path)
    merge = processor.image_processor.merge_size ** 2
    assert meta["sample_ids"] == [r["sample_id"] for r in rows]
    for i, row in enumerate(rows):
        s = ragged.sample(packed, i)
        ids = s["input_ids"][0]
        # vision tokens: exactly the image-pad tokens, as many as the grid says
        assert torch.equal(s["vision_mask"][0], ids == config.image_token_id)
        assert int(s["vision_mask"].sum()) == int(s["image_grid_thw"].prod(-1).sum()) // merge
        assert s["image_grid_thw"].shape[0] == len(row["images"]) == 2
        # caption tokens decode to the captions, in order; labels only there
        captions = [t["text"] for t in row["turns"] if t["role"] == "assistant"]
        cap = s["caption_mask"][0]
        assert processor.tokenizer.decode(ids[cap]) == "".join(captions)
        assert torch.equal(s["labels"][0] != -100, cap)
        assert torch.equal(s["labels"][0][cap], ids[cap])
        assert not (cap & s["vision_mask"][0]).any()
        # the same row through the processor directly gives the same ids
        direct = adapter.encode(processor, config, row)
        assert torch.equal(direct["input_ids"][0], ids)
        assert torch.equal(direct["pixel_values"], s["pixel_values"])


def test_collate_pads_right_and_marks_padding(encoded):
    _, packed, _ = encoded
    samples = [ragged.sample(packed, i) for i in range(ragged.n_samples(packed))]
    batch = ragged.collate(samples)
    lengths = [s["input_ids"].shape[1] for s in samples]
    assert batch["input_ids"].shape == (3, max(lengths))
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["labels"][i, n:] == -100).all() and not batch["caption_mask"][i, n:].any()
    assert batch["pixel_values"].shape[0] == sum(s["pixel_values"].shape[0] for s in samples)


def test_unknown_family():
    with pytest.raises(VlmquantError, match="unknown model family 'gpt5_vl'"):
        get_adapter("gpt5_vl")


def test_missing_model_folder(encoded, tmp_path, demo_data):
    build_calib(coco_cfg(demo_data, n_samples=1), tmp_path / "c.parquet")
    out = tmp_path / "inputs.safetensors"
    with pytest.raises(VlmquantError) as e:
        build_inputs(tmp_path / "c.parquet", open_demo(tmp_path / "nope"), out)
    assert "nope" in str(e.value) and "config.json" in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()
