"""Demo calibration data: real photos shipped inside pip packages, hand-written captions, prose.

The captions, the corpus and SOURCES.md live in `vlmquant/demo/data/`. The photos are copied
byte for byte from scikit-image, scikit-learn and matplotlib, which vlmquant depends on.
"""
import importlib.util
import json
import shutil
from importlib import resources
from pathlib import Path

from PIL import Image

from vlmquant.errors import VlmquantError
from vlmquant.io.atomic import atomic_path

PACKAGED_FILES = ("captions_train.json", "captions_val.json", "text.jsonl", "SOURCES.md")
SPLITS = ("train", "val")

# file name -> (pip name, import name, path inside the installed package)
PHOTO_SOURCES = {
    "astronaut.png": ("scikit-image", "skimage", "data/astronaut.png"),
    "coffee.png": ("scikit-image", "skimage", "data/coffee.png"),
    "chelsea.png": ("scikit-image", "skimage", "data/chelsea.png"),
    "china.jpg": ("scikit-learn", "sklearn", "datasets/images/china.jpg"),
    "hubble_deep_field.jpg": ("scikit-image", "skimage", "data/hubble_deep_field.jpg"),
    "ihc.png": ("scikit-image", "skimage", "data/ihc.png"),
    "motorcycle_left.png": ("scikit-image", "skimage", "data/motorcycle_left.png"),
    "motorcycle_right.png": ("scikit-image", "skimage", "data/motorcycle_right.png"),
    "camera.png": ("scikit-image", "skimage", "data/camera.png"),
    "moon.png": ("scikit-image", "skimage", "data/moon.png"),
    "clock_motion.png": ("scikit-image", "skimage", "data/clock_motion.png"),
    "page.png": ("scikit-image", "skimage", "data/page.png"),
    "brick.png": ("scikit-image", "skimage", "data/brick.png"),
    "grass.png": ("scikit-image", "skimage", "data/grass.png"),
    "grace_hopper.jpg": ("matplotlib", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "flower.jpg": ("scikit-learn", "sklearn", "datasets/images/flower.jpg"),
    "rocket.jpg": ("scikit-image", "skimage", "data/rocket.jpg"),
    "retina.jpg": ("scikit-image", "skimage", "data/retina.jpg"),
    "coins.png": ("scikit-image", "skimage", "data/coins.png"),
    "text.png": ("scikit-image", "skimage", "data/text.png"),
    "gravel.png": ("scikit-image", "skimage", "data/gravel.png"),
}


def packaged(name):
    """A file of `vlmquant/demo/data/` (a Traversable; use read_bytes/read_text)."""
    return resources.files("vlmquant.demo").joinpath("data", name)


def load_captions(split):
    """The COCO-style caption table of split "train" (set `demo`) or "val" (set `demo-holdout`)."""
    if split not in SPLITS:
        raise VlmquantError(f"demo captions: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return json.loads(packaged(f"captions_{split}.json").read_text(encoding="utf-8"))


def load_corpus():
    """The paragraphs of the demo text corpus, in file order."""
    lines = packaged("text.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def photo_path(file_name):
    """Where the installed package keeps the original photo `file_name`."""
    pip_name, module, inner = PHOTO_SOURCES[file_name]
    # find_spec of a top-level name locates the package without importing it
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise VlmquantError(f"demo photo {file_name}: package {pip_name} is not installed; "
                            f"run `pip install {pip_name}`")
    path = Path(spec.origin).parent / inner
    if not path.is_file():
        raise VlmquantError(f"demo photo {file_name}: {path} is missing from the installed "
                            f"{pip_name}; reinstall it")
    return path


def write_demo_data(out_dir):
    """Write images/<file_name>, both caption files, text.jsonl and SOURCES.md under `out_dir`.

    Images are exact copies of the originals; every file is written atomically, and reruns
    produce identical bytes. Returns `out_dir` as a Path.
    """
    out_dir = Path(out_dir)
    for split in SPLITS:
        for image in load_captions(split)["images"]:
            name = image["file_name"]
            source = photo_path(name)
            with Image.open(source) as img:
                size = img.size
            if size != (image["width"], image["height"]):
                raise VlmquantError(f"demo photo {source}: size {size[0]}x{size[1]} differs from "
                                    f"captions_{split}.json ({image['width']}x{image['height']})")
            with atomic_path(out_dir / "images" / name) as tmp:
                shutil.copyfile(source, tmp)
    for name in PACKAGED_FILES:
        with atomic_path(out_dir / name) as tmp:
            tmp.write_bytes(packaged(name).read_bytes())
    return out_dir
