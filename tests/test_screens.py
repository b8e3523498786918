"""Inputs-stage screens: the model's own special tokens, processor failures named by sample."""
import io
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmquant.data.calib import SCHEMA, build_calib
from vlmquant.data.inputs import build_inputs
from vlmquant.data.screens import check_text_for_special_tokens, special_tokens
from vlmquant.errors import VlmquantError
from vlmquant.models import get_adapter

from conftest import open_demo
from test_calib import coco_cfg


@pytest.mark.parametrize("family,token", [
    ("qwen2_vl", "<|im_end|>"), ("qwen2_vl", "<|image_pad|>"), ("llava", "</s>"), ("llava", "<image>"),
    ("llava_onevision", "<|im_start|>"), ("internvl", "<IMG_CONTEXT>"), ("internvl", "</img>"),
])
def test_special_tokens_of_the_tokenizer(family, token):
    tokenizer = get_adapter(family).demo()[1].tokenizer
    assert token in special_tokens(tokenizer)
    check_text_for_special_tokens("A plain caption with <b>tags</b> and s> and |im_end|.", tokenizer, "x")
    with pytest.raises(VlmquantError) as e:
        check_text_for_special_tokens(f"A cat.{token} More.", tokenizer, "c.parquet: sample coco-1, turn 1")
    assert str(e.value) == (f"c.parquet: sample coco-1, turn 1: contains {token!r}, a special token of the "
                            f"model's tokenizer; remove it from the text")


def test_special_tokens_are_what_the_tokenizer_splits_out():
    """Each listed string tokenizes to one special id: the screen lists exactly the tokenizer's own."""
    tokenizer = get_adapter("internvl").demo()[1].tokenizer
    special_ids = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for token in special_tokens(tokenizer):
        ids = tokenizer(f"a {token} b", add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_tokens_to_ids(token) in ids and tokenizer.convert_tokens_to_ids(token) in special_ids


def test_inputs_refuse_a_caption_with_the_models_token(demo_data, demo_model_path, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    raw = json.loads((data / "captions_train.json").read_text())
    for ann in raw["annotations"]:
        ann["caption"] += "<|im_end|>"  # not an image placeholder: the calib stage lets it through
    (data / "captions_train.json").write_text(json.dumps(raw))
    calib = tmp_path / "c.parquet"
    build_calib(coco_cfg(data, n_samples=2), calib)
    out = tmp_path / "inputs.safetensors"
    with pytest.raises(VlmquantError) as e:
        build_inputs(calib, open_demo(demo_model_path), out)
    assert str(e.value).startswith(f"{calib}: sample coco-") and "turn 1 (assistant): contains '<|im_end|>'" in str(e.value)
    assert not out.exists()


def test_processor_failure_names_the_sample(demo_model_path, tmp_path, caplog):
    """A row the calib screens never saw (written by hand) that the processor refuses: one line."""
    buf = io.BytesIO()
    Image.new("RGB", (4100, 20)).save(buf, "PNG")
    row = {"sample_id": "s9", "image_ids": ["9"], "file_names": ["strip.png"], "images": [buf.getvalue()],
           "image_sha256": ["0"], "turns": [{"role": "user", "text": "Describe.", "images": [0]},
                                            {"role": "assistant", "text": "A strip.", "images": []}]}
    calib = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), calib)
    out = tmp_path / "inputs.safetensors"
    with pytest.raises(VlmquantError) as e:
        build_inputs(calib, open_demo(demo_model_path), out)
    assert str(e.value) == (f"{calib}: sample s9 (strip.png) could not be encoded for qwen2_vl (ValueError: absolute "
                            f"aspect ratio must be smaller than 200, got 205.0); traceback in the log")
    (record,) = [r for r in caplog.records if r.name == "vlmquant.data.inputs"]
    assert record.exc_info[0] is ValueError  # the full traceback reaches the job's log
    assert not out.exists()


def test_sharegpt_system_turn_and_two_images_encode(demo_data, demo_model_path, tmp_path):
    """A ShareGPT row with its own system turn and two images goes through the qwen2_vl processor:
    the template uses that system turn instead of its default, and both images get vision tokens."""
    from vlmquant.io import ragged

    rows = [{"id": f"r{k}", "image": ["astronaut.png", "coffee.png"], "conversations": [
        {"from": "system", "value": "Answer briefly."}, {"from": "human", "value": "<image>\nWhat is this?"},
        {"from": "gpt", "value": "An astronaut."}, {"from": "human", "value": "And this? <image>"},
        {"from": "gpt", "value": "A cup of coffee."}]} for k in range(2)]
    (tmp_path / "conv.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {"source": "sharegpt", "captions": str(tmp_path / "conv.jsonl"), "images": str(demo_data / "images"),
           "n_samples": 1, "seed": 0, "format": "plain"}
    build_calib(cfg, tmp_path / "c.parquet")
    build_inputs(tmp_path / "c.parquet", open_demo(demo_model_path), tmp_path / "in.st")
    packed, _ = ragged.load(tmp_path / "in.st")
    s = ragged.sample(packed, 0)
    tokenizer = get_adapter("qwen2_vl").demo()[1].tokenizer
    text = tokenizer.decode(s["input_ids"][0])
    assert text.count("Answer briefly.") == 1 and "You are a helpful assistant." not in text
    first_answer = text.index("An astronaut.")
    assert text.index("<|vision_start|>") < first_answer < text.index("<|vision_start|>", first_answer)  # one each
    assert s["image_grid_thw"].shape[0] == 2 and text.count("<|vision_start|>") == 2
    assert tokenizer.decode(s["input_ids"][0][s["caption_mask"][0]]) == "An astronaut.A cup of coffee."


def test_inputs_see_transparency_on_white(demo_model_path, tmp_path):
    """An RGBA image's pixel_values in the inputs file are those of decode_image (white background)."""
    import numpy as np
    import torch

    from vlmquant.data.images import decode_image
    from vlmquant.io import ragged

    a = np.zeros((64, 96, 4), np.uint8)
    a[16:48, 16:48] = (255, 0, 0, 255)  # an opaque red square on a transparent background
    buf = io.BytesIO()
    Image.fromarray(a, "RGBA").save(buf, "PNG")
    row = {"sample_id": "t1", "image_ids": ["1"], "file_names": ["logo.png"], "images": [buf.getvalue()],
           "image_sha256": ["0"], "turns": [{"role": "user", "text": "Describe.", "images": [0]},
                                            {"role": "assistant", "text": "A red square.", "images": []}]}
    pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), tmp_path / "c.parquet")
    build_inputs(tmp_path / "c.parquet", open_demo(demo_model_path), tmp_path / "in.st")
    packed, _ = ragged.load(tmp_path / "in.st")
    image_processor = get_adapter("qwen2_vl").demo()[1].image_processor
    expected = image_processor(images=[decode_image(buf.getvalue(), "x")], return_tensors="pt")["pixel_values"]
    assert torch.equal(ragged.sample(packed, 0)["pixel_values"], expected)
