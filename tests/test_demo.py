"""The offline demo: packaged calibration data and tiny random-init VLMs."""
import json

import pytest
from PIL import Image

from vlmquant.demo.dataset import PHOTO_SOURCES, load_corpus, photo_path, write_demo_data


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
