"""The offline demo: packaged calibration data and tiny random-init VLMs."""
import json

import pytest
import torch
import transformers
from PIL import Image

from vlmquant.demo.dataset import PHOTO_SOURCES, load_corpus, photo_path, write_demo_data
from vlmquant.models import family_names, get_adapter
from vlmquant.models.processing import load_processor
from vlmquant.models.tiny import DEMO_PROMPT, build_demo_model, make_demo_model


def read_tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("demo") / "data")


def test_data_files_written(demo_data):
    names = set(read_tree(demo_data))
    assert {"captions_train.json", "captions_val.json", "text.jsonl", "SOURCES.md"} <= names
    assert {f"images/{name}" for name in PHOTO_SOURCES} <= names


@pytest.mark.parametrize("split", ["train", "val"])
def test_captions_match_images(demo_data, split):
    coco = json.loads((demo_data / f"captions_{split}.json").read_text())
    assert len(coco["images"]) >= (12 if split == "train" else 6)
    assert len({im["id"] for im in coco["images"]}) == len(coco["images"])
    for image in coco["images"]:
        with Image.open(demo_data / "images" / image["file_name"]) as img:
            assert img.size == (image["width"], image["height"])
        captions = [a["caption"] for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert len(captions) >= 2
        assert all(8 <= len(c.split()) <= 20 for c in captions)
    assert {a["image_id"] for a in coco["annotations"]} <= {im["id"] for im in coco["images"]}
    assert {im["license"] for im in coco["images"]} <= {lic["id"] for lic in coco["licenses"]}


def test_splits_disjoint_and_cover_all_photos(demo_data):
    files = {}
    for split in ("train", "val"):
        coco = json.loads((demo_data / f"captions_{split}.json").read_text())
        files[split] = {im["file_name"] for im in coco["images"]}
    assert not files["train"] & files["val"]
    assert files["train"] | files["val"] == set(PHOTO_SOURCES)
    assert len(PHOTO_SOURCES) >= 18


def test_images_are_exact_copies(demo_data):
    for name in PHOTO_SOURCES:
        assert (demo_data / "images" / name).read_bytes() == photo_path(name).read_bytes()


def test_rewrite_is_byte_identical(demo_data, tmp_path):
    again = write_demo_data(tmp_path / "again")
    assert read_tree(again) == read_tree(demo_data)


def test_text_corpus():
    paragraphs = load_corpus()
    assert len(paragraphs) >= 40
    assert sum(len(p.split()) for p in paragraphs) >= 3000


# ---- demo models ----

def load_demo(path, family):
    model = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = load_processor(path, getattr(transformers, get_adapter(family).processor_class))
    return model, processor


def demo_inputs(processor, image):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEMO_PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt")


@pytest.fixture(scope="module")
def photo():
    with Image.open(photo_path("chelsea.png")) as img:
        return img.convert("RGB")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("qwen2_vl") / "model")


def test_qwen2_vl_folder(qwen_dir):
    names = {p.name for p in qwen_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json", "chat_template.jinja"} <= names
    processor_config = json.loads((qwen_dir / "processor_config.json").read_text())
    assert processor_config["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    config = transformers.AutoConfig.from_pretrained(qwen_dir)
    text = config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (4, 256, 768)
    assert text.num_attention_heads == text.num_key_value_heads == 4
    assert config.vision_config.hidden_size == text.hidden_size


def test_qwen2_vl_reload_gives_identical_logits(qwen_dir, photo):
    model, processor = make_demo_model()
    reloaded, reprocessor = load_demo(qwen_dir, "qwen2_vl")
    assert type(reloaded) is transformers.Qwen2VLForConditionalGeneration
    assert type(reprocessor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    inputs, reinputs = demo_inputs(processor, photo), demo_inputs(reprocessor, photo)
    assert torch.equal(inputs["input_ids"], reinputs["input_ids"])
    assert torch.equal(inputs["pixel_values"], reinputs["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**reinputs).logits)


def test_qwen2_vl_build_is_deterministic(qwen_dir, tmp_path):
    assert read_tree(build_demo_model(tmp_path / "same")) == read_tree(qwen_dir)
    other = build_demo_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (qwen_dir / "model.safetensors").read_bytes()


def test_qwen2_vl_image_tokens_match_grid(qwen_dir, photo):
    model, processor = load_demo(qwen_dir, "qwen2_vl")
    with Image.open(photo_path("retina.jpg")) as large:  # 1411x1411, downscaled to at most 224x224
        images = [photo, large.convert("RGB")]
    for image in images:
        inputs = demo_inputs(processor, image)
        grid = inputs["image_grid_thw"]
        n_pad = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert n_pad == int(grid.prod()) // processor.image_processor.merge_size ** 2
        assert 4 <= n_pad <= 64


def test_qwen2_vl_generates(qwen_dir, photo):
    model, processor = load_demo(qwen_dir, "qwen2_vl")
    inputs = demo_inputs(processor, photo)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert model.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_qwen2_vl_tokenizer_and_template(qwen_dir, photo):
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    assert 1000 <= len(tokenizer) <= 2100
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    text = "A photo of a cat, 42 kilometres away: ünïcode too!"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    special = "<|im_start|><|im_end|><|vision_start|><|vision_end|><|image_pad|><|video_pad|><|endoftext|>"
    assert len(tokenizer(special)["input_ids"]) == 7
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    _, processor = load_demo(qwen_dir, "qwen2_vl")
    messages = [{"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": DEMO_PROMPT}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A tabby cat."}]}]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    reply = [i for i, m in zip(out["input_ids"][0], out["assistant_masks"][0]) if m]
    assert processor.tokenizer.decode(reply) == "A tabby cat.<|im_end|>"


@pytest.mark.parametrize("family", [f for f in family_names() if f != "qwen2_vl"])
def test_other_families_build_reload_forward(family, tmp_path, photo):
    model, processor = make_demo_model(family)
    path = build_demo_model(tmp_path / family, family)
    reloaded, reprocessor = load_demo(path, family)
    assert type(reloaded) is type(model)
    text = reloaded.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (4, 256, 768)
    assert text.num_attention_heads == text.num_key_value_heads == 4
    inputs = demo_inputs(reprocessor, photo)
    image_token_id = getattr(reloaded.config, "image_token_id", None) or reloaded.config.image_token_index
    assert 0 < int((inputs["input_ids"] == image_token_id).sum()) <= 128
    with torch.no_grad():
        logits = reloaded(**inputs).logits
        assert torch.equal(logits, model(**demo_inputs(processor, photo)).logits)
    assert logits.shape == (1, inputs["input_ids"].shape[1], text.vocab_size)
    assert torch.isfinite(logits).all()
