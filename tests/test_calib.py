"""Calibration readers, deterministic sampling, formats, and bad input."""
import hashlib
import json
import shutil

import pytest

from vlmquant.data.calib import build_calib, calib_metadata, draw, read_calib, sample_rows
from vlmquant.data.readers import read_coco_captions, read_sharegpt, read_text_corpus
from vlmquant.errors import VlmquantError


def coco_cfg(data, **kw):
    cfg = {"source": "coco", "captions": str(data / "captions_train.json"), "images": str(data / "images"),
           "text": str(data / "text.jsonl"), "n_samples": 4, "seed": 0, "format": "plain",
           "prompt": "Describe this image.", "interleave_tokens": 64}
    cfg.update(kw)
    return cfg


def test_coco_reader_groups_captions_by_image(demo_data):
    raw = json.loads((demo_data / "captions_train.json").read_text())
    recs = read_coco_captions(demo_data / "captions_train.json")
    assert len(recs) == len(raw["images"])
    by_id = {str(i["id"]): i["file_name"] for i in raw["images"]}
    n_caps = sum(len(c) for _, _, c in recs)
    assert n_caps == len(raw["annotations"])
    for image_id, file_name, caps in recs:
        assert by_id[image_id] == file_name and len(caps) >= 2


def test_sharegpt_reader(tmp_path):
    rows = [{"id": "a", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Grey."}]},
        {"id": "b", "image": "y.png", "conversations": [
            {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A dog."}]}]
    path = tmp_path / "conv.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    a, b = read_sharegpt(path)
    assert [t.role for t in a.turns] == ["user", "assistant", "user", "assistant"]
    assert a.turns[0].text == "What is this?" and a.turns[0].images == (0,)
    assert a.turns[2].images == ()
    assert b.turns[0].images == (0,)  # no placeholder: the image goes before the first human turn
    assert read_sharegpt(tmp_path / "conv.jsonl")[0].file_names == ("x.png",)


def test_text_corpus(demo_data):
    paragraphs = read_text_corpus(demo_data / "text.jsonl")
    assert len(paragraphs) >= 40 and all(isinstance(p, str) and p for p in paragraphs)


def test_sampling_is_deterministic_and_seeded(demo_data):
    a = sample_rows(coco_cfg(demo_data))
    b = sample_rows(coco_cfg(demo_data))
    c = sample_rows(coco_cfg(demo_data, seed=1))
    assert a == b
    assert [s.sample_id for s in a] != [s.sample_id for s in c]
    assert len({s.image_ids for s in a}) == 4  # distinct images


def test_formats(demo_data):
    plain = sample_rows(coco_cfg(demo_data, format="plain"))
    few = sample_rows(coco_cfg(demo_data, format="few_shot"))
    inter = sample_rows(coco_cfg(demo_data, format="interleave", interleave_tokens=50))
    assert all(len(s.file_names) == 1 and len(s.turns) == 2 for s in plain)
    for s in few:
        assert len(s.file_names) == 2 and len(set(s.file_names)) == 2
        assert [t.role for t in s.turns] == ["user", "assistant", "user", "assistant"]
        assert [t.images for t in s.turns] == [(0,), (), (1,), ()]
    for s in inter:
        assert [t.role for t in s.turns] == ["user", "assistant", "user", "user", "assistant"]
        middle = s.turns[2]
        assert middle.images == () and len(middle.text.split()) == 50


def test_text_format_is_the_plain_rows_without_their_images(demo_data, tmp_path):
    plain = sample_rows(coco_cfg(demo_data, format="plain"))
    text = sample_rows(coco_cfg(demo_data, format="text"))
    assert [s.sample_id for s in text] == [s.sample_id for s in plain]
    for s, p in zip(text, plain):
        assert s.image_ids == () and s.file_names == () and all(t.images == () for t in s.turns)
        assert [(t.role, t.text) for t in s.turns] == [(t.role, t.text) for t in p.turns]  # prompt, caption
    build_calib(coco_cfg(demo_data, format="text"), tmp_path / "t.parquet")
    rows = read_calib(tmp_path / "t.parquet")
    assert [r["images"] for r in rows] == [[]] * 4 and all(t["images"] == [] for r in rows for t in r["turns"])
    assert rows[0]["turns"][1]["text"] == plain[0].turns[1].text


def test_parquet_columns_metadata_and_bytes(demo_data, tmp_path):
    out = tmp_path / "c.parquet"
    build_calib(coco_cfg(demo_data), out)
    rows = read_calib(out)
    assert len(rows) == 4
    r = rows[0]
    assert set(r) >= {"sample_id", "image_ids", "file_names", "images", "image_sha256", "turns"}
    assert r["images"][0] == (demo_data / "images" / r["file_names"][0]).read_bytes()
    assert r["image_sha256"][0] == hashlib.sha256(r["images"][0]).hexdigest()
    meta = calib_metadata(out)
    assert meta["config"]["n_samples"] == 4
    assert str(demo_data / "captions_train.json") in meta["sources"]
    assert "torch" in meta["packages"]
    out2 = tmp_path / "c2.parquet"
    build_calib(coco_cfg(demo_data), out2)
    assert out.read_bytes() == out2.read_bytes()


# --- bad input: one line naming the file and field, no output left behind -------------------
def bad_copy(demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    return data


def expect_error(cfg, tmp_path, *needles):
    out = tmp_path / "out.parquet"
    with pytest.raises(VlmquantError) as e:
        build_calib(cfg, out)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.parquet")]  # no temp file either
    return msg


def all_images_cfg(data):
    n = len(json.loads((data / "captions_train.json").read_text())["images"])
    return coco_cfg(data, n_samples=n)


def test_missing_image(demo_data, tmp_path):
    data = bad_copy(demo_data, tmp_path)
    victim = json.loads((data / "captions_train.json").read_text())["images"][0]["file_name"]
    (data / "images" / victim).unlink()
    expect_error(all_images_cfg(data), tmp_path, victim, "not found")


def test_corrupt_image(demo_data, tmp_path):
    data = bad_copy(demo_data, tmp_path)
    victim = json.loads((data / "captions_train.json").read_text())["images"][0]["file_name"]
    (data / "images" / victim).write_bytes(b"this is not an image")
    expect_error(all_images_cfg(data), tmp_path, victim, "not a readable image")


def test_malformed_captions_json(demo_data, tmp_path):
    data = bad_copy(demo_data, tmp_path)
    (data / "captions_train.json").write_text('{"images": [')
    expect_error(coco_cfg(data), tmp_path, "captions_train.json", "not valid JSON")
    (data / "captions_train.json").write_text('{"images": [{"id": 1}], "annotations": []}')
    expect_error(coco_cfg(data), tmp_path, "captions_train.json", "images[0]", "file_name")


def test_image_without_caption(demo_data, tmp_path):
    data = bad_copy(demo_data, tmp_path)
    raw = json.loads((data / "captions_train.json").read_text())
    first = raw["images"][0]
    raw["annotations"] = [a for a in raw["annotations"] if a["image_id"] != first["id"]]
    (data / "captions_train.json").write_text(json.dumps(raw))
    expect_error(coco_cfg(data), tmp_path, "captions_train.json", first["file_name"], "no caption")


def test_too_many_samples(demo_data, tmp_path):
    expect_error(coco_cfg(demo_data, n_samples=1000), tmp_path, "n_samples 1000", "captions_train.json")
    expect_error(coco_cfg(demo_data, n_samples=10, format="few_shot"), tmp_path, "needs 20")


def test_unknown_format(demo_data, tmp_path):
    expect_error(coco_cfg(demo_data, format="fewshot"), tmp_path, "unknown format 'fewshot'")


# --- sampling: a function of (seed, sample ids) only --------------------------------------------
def sharegpt_pool(tmp_path, n=10):
    rows = [{"id": f"s{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": f"A{i}"}]} for i in range(n)]
    return rows, {"source": "sharegpt", "captions": str(tmp_path / "c.json"), "images": str(tmp_path),
                  "n_samples": 4, "seed": 0, "format": "plain"}


def test_sampling_is_pinned_and_ignores_file_order(tmp_path):
    """The picks are sha256 ranks of the sample ids: these values hold on every Python version."""
    rows, cfg = sharegpt_pool(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps(rows))
    assert [s.sample_id for s in sample_rows(cfg)] == ["s5", "s0", "s6", "s7"]
    assert [s.sample_id for s in sample_rows(dict(cfg, seed=1))] == ["s6", "s4", "s8", "s0"]
    assert draw(0, "sample", "s5") == int(hashlib.sha256(b"0/sample/s5").hexdigest(), 16)
    (tmp_path / "c.json").write_text(json.dumps(rows[::-1]))
    assert [s.sample_id for s in sample_rows(cfg)] == ["s5", "s0", "s6", "s7"]


def test_coco_caption_choice_ignores_file_order(demo_data, tmp_path):
    data = bad_copy(demo_data, tmp_path)
    raw = json.loads((data / "captions_train.json").read_text())
    before = sample_rows(all_images_cfg(data))
    raw["images"], raw["annotations"] = raw["images"][::-1], raw["annotations"][::-1]
    (data / "captions_train.json").write_text(json.dumps(raw))
    after = {s.sample_id: s for s in sample_rows(all_images_cfg(data))}
    # same images, same caption per image (captions are drawn by image id, not by position)
    assert {s.sample_id: s.turns for s in before} == {k: s.turns for k, s in after.items()}


@pytest.mark.parametrize("key,value,needle", [
    ("n_samples", 0, "n_samples must be an integer >= 1, got 0"),
    ("n_samples", True, "n_samples must be an integer >= 1, got True"),
    ("n_samples", 2.0, "n_samples must be an integer >= 1, got 2.0"),
    ("seed", "0", "seed must be an integer, got '0'"),
    ("source", "COCO", "unknown source 'COCO'; choose one of coco, sharegpt"),
])
def test_bad_settings(demo_data, tmp_path, key, value, needle):
    expect_error(coco_cfg(demo_data, **{key: value}), tmp_path, "calib 'calib': " + needle)


def test_few_shot_keeps_one_system_turn(tmp_path):
    rows, cfg = sharegpt_pool(tmp_path, 4)
    for r in rows:
        r["conversations"].insert(0, {"from": "system", "value": f"System of {r['id']}."})
    (tmp_path / "c.json").write_text(json.dumps(rows))
    (row,) = sample_rows(dict(cfg, n_samples=1, format="few_shot"))
    assert [t.role for t in row.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert row.turns[0].text == f"System of {row.sample_id.split('+')[0]}."
    assert [t.images for t in row.turns] == [(), (0,), (), (1,), ()]


def test_interleave_text_screens(demo_data, tmp_path):
    data = bad_copy(demo_data, tmp_path)
    (data / "short.jsonl").write_text('{"text": "only five words in here"}\n')
    expect_error(coco_cfg(data, format="interleave", text=str(data / "short.jsonl")), tmp_path,
                 "short.jsonl: 5 words of text, but interleave_tokens is 64")
    (data / "bad.jsonl").write_text('{"text": "fine"}\n\n{"text": "see <image> here"}\n')
    expect_error(coco_cfg(data, format="interleave", text=str(data / "bad.jsonl")), tmp_path,
                 "bad.jsonl: line 3.text: contains the image placeholder '<image>'")


def test_prompt_with_placeholder(demo_data, tmp_path):
    expect_error(coco_cfg(demo_data, prompt="<image> Describe."), tmp_path,
                 "calib 'calib': prompt: contains the image placeholder '<image>'")


# --- images: screened at the calib stage, naming the file and the sample -------------------------
def coco_with_image(demo_data, tmp_path, img, fmt="PNG", name="victim.png"):
    """The demo set with its first image replaced by `img` (saved as `name`)."""
    data = bad_copy(demo_data, tmp_path)
    raw = json.loads((data / "captions_train.json").read_text())
    first = raw["images"][0]
    first["file_name"] = name
    img.save(data / "images" / name, fmt)
    (data / "captions_train.json").write_text(json.dumps(raw))
    return data, f"coco-{first['id']}"


@pytest.mark.parametrize("size,needle", [
    ((4100, 20), "image is 4100x20 pixels; sides shorter than 32"),
    ((32 * 201, 32), "image is 6432x32 pixels, aspect ratio 201.00, over 200"),
    ((20, 20), "image is 20x20 pixels; sides shorter than 32"),
])
def test_images_the_processors_refuse(demo_data, tmp_path, size, needle):
    from PIL import Image

    data, sample_id = coco_with_image(demo_data, tmp_path, Image.new("RGB", size))
    expect_error(all_images_cfg(data), tmp_path, f"sample {sample_id}: {data}/images/victim.png: {needle}")


def test_unsupported_image_mode(demo_data, tmp_path):
    import numpy as np
    from PIL import Image

    img = Image.fromarray(np.full((64, 64), 0.5, np.float32), "F")
    data, sample_id = coco_with_image(demo_data, tmp_path, img, "TIFF", "victim.tif")
    expect_error(all_images_cfg(data), tmp_path, f"sample {sample_id}: {data}/images/victim.tif: image mode F is not supported")


def test_sixteen_bit_image_is_kept_as_its_bytes(demo_data, tmp_path):
    import numpy as np
    from PIL import Image

    img = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    data, sample_id = coco_with_image(demo_data, tmp_path, img)
    out = tmp_path / "c.parquet"
    build_calib(all_images_cfg(data), out)
    (row,) = [r for r in read_calib(out) if r["sample_id"] == sample_id]
    assert row["images"] == [(data / "images" / "victim.png").read_bytes()]


def test_missing_image_folder(demo_data, tmp_path):
    expect_error(coco_cfg(demo_data, images=str(tmp_path / "nope")), tmp_path,
                 f"calib 'calib': image folder {tmp_path / 'nope'} not found (calib.calib.images)")


def test_duplicate_coco_ids_leave_no_output(demo_data, tmp_path):
    data = bad_copy(demo_data, tmp_path)
    raw = json.loads((data / "captions_train.json").read_text())
    raw["images"][1]["id"] = str(raw["images"][0]["id"])
    (data / "captions_train.json").write_text(json.dumps(raw))
    expect_error(coco_cfg(data), tmp_path, "captions_train.json: images[1]: id", "repeats images[0]")
