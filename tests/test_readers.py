"""Source validation: COCO captions, ShareGPT, text corpus, JSON/JSONL error positions."""
import json

import pytest

from vlmquant.data.readers import read_coco_captions, read_sharegpt, read_text_corpus
from vlmquant.data.screens import PLACEHOLDERS
from vlmquant.errors import VlmquantError


def write_json(path, value):
    path.write_text(json.dumps(value))
    return path


def coco(images, annotations):
    return {"images": [{"id": i, "file_name": f} for i, f in images],
            "annotations": [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(annotations)]}


def coco_error(tmp_path, data):
    path = write_json(tmp_path / "captions.json", data)
    with pytest.raises(VlmquantError) as e:
        read_coco_captions(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    return msg[len(f"{path}: "):]


# --- COCO ------------------------------------------------------------------------------------
def test_coco_values_in_file_order(tmp_path):
    data = coco([(7, "b.png"), ("x1", "sub/a.png")],
                [(7, " a red square "), ("x1", "a blue square"), (7, "red")])
    data["annotations"].append({"id": 9, "image_id": "7", "caption": "crimson"})  # "7" names image 7
    assert read_coco_captions(write_json(tmp_path / "c.json", data)) == [
        ("7", "b.png", ["a red square", "red", "crimson"]), ("x1", "sub/a.png", ["a blue square"])]


def test_coco_duplicate_ids(tmp_path):
    two_ones = coco([(1, "red.png"), (1, "blue.png")], [(1, "a red square")])
    assert coco_error(tmp_path, two_ones) == ("images[1]: id 1 repeats images[0] (id 1); image ids must be unique")
    typed = coco([(1, "red.png"), ("1", "blue.png")], [(1, "a red square")])
    assert coco_error(tmp_path, typed) == "images[1]: id '1' repeats images[0] (id 1); image ids must be unique"


def test_coco_annotation_of_unknown_image(tmp_path):
    data = coco([(1, "red.png")], [(1, "a red square"), (2, "a blue square")])
    assert coco_error(tmp_path, data) == "annotations[1]: image_id 2 is not an id in 'images'"


def test_coco_image_without_caption(tmp_path):
    data = coco([(1, "red.png"), (2, "blue.png")], [(1, "a red square")])
    assert coco_error(tmp_path, data) == "images[1] (id 2, blue.png) has no caption in 'annotations'"


@pytest.mark.parametrize("name,why", [
    ("red.png", "repeats images[0]"), ("./red.png", "repeats images[0]"),
    ("", "is empty or invalid"), (" ", "is empty or invalid"),
    ("/data/blue.png", "must be a relative path inside the image folder"),
    ("../blue.png", "must be a relative path inside the image folder"),
    ("sub/../../blue.png", "must be a relative path inside the image folder"),
])
def test_coco_bad_file_names(tmp_path, name, why):
    msg = coco_error(tmp_path, coco([(1, "red.png"), (2, name)], [(1, "a"), (2, "b")]))
    assert msg.startswith("images[1]") and why in msg and repr(name) in msg, msg


@pytest.mark.parametrize("field,value,needle", [
    ("file_name", 5, "images[0]: field 'file_name' must be str, got int"),
    ("id", 1.0, "images[0]: field 'id' must be int or str, got float"),
    ("id", True, "images[0]: field 'id' must be int or str, got bool"),
    ("id", " ", "images[0].id: empty id"),
])
def test_coco_field_types(tmp_path, field, value, needle):
    data = coco([(1, "red.png")], [(1, "a")])
    data["images"][0][field] = value
    assert coco_error(tmp_path, data) == needle


@pytest.mark.parametrize("caption", ["", "   \n\t"])
def test_coco_empty_caption(tmp_path, caption):
    data = coco([(1, "red.png"), (2, "blue.png")], [(1, "a red square"), (2, "a blue square"), (2, caption)])
    assert coco_error(tmp_path, data) == ("annotations[2].caption (image 2): empty text; "
                                          "give it words or remove the entry")


@pytest.mark.parametrize("token", PLACEHOLDERS)
def test_coco_caption_with_placeholder(tmp_path, token):
    data = coco([(1, "red.png")], [(1, f"a red {token} square")])
    assert coco_error(tmp_path, data).startswith(
        f"annotations[0].caption (image 1): contains the image placeholder {token!r}")


def test_placeholder_list_covers_the_processors():
    """The image/video/boundary tokens of every family's transformers processor are screened."""
    from vlmquant.models import family_names, get_adapter

    for family in family_names():
        processor = get_adapter(family).demo()[1]
        names = ("image_token", "video_token", "vision_start_token", "vision_end_token", "start_image_token",
                 "end_image_token")
        tokens = {getattr(processor, n) for n in names if getattr(processor, n, None)}
        assert processor.image_token in tokens and tokens <= set(PLACEHOLDERS), (family, tokens)


# --- JSON / JSONL positions --------------------------------------------------------------------
def test_jsonl_errors_name_the_files_line(tmp_path):
    lines = ['{"text": "one"}', "", '{"text": "two"}', "   ", '{"text": "three",}', '{"text": "four"}']
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(VlmquantError) as e:
        read_text_corpus(path)
    assert str(e.value) == (f"{path}: line 5: not valid JSON at column 18 "
                            f"(Expecting property name enclosed in double quotes)")
    lines[4] = '{"text": 3}'
    path.write_text("\n".join(lines))
    with pytest.raises(VlmquantError, match=r"corpus.jsonl: line 5: field 'text' must be str, got int$"):
        read_text_corpus(path)


def test_bom_and_crlf_are_read(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n\r\n{"text": "two \\u2028 lines"}\r\n')
    assert read_text_corpus(path) == ["one", "two \u2028 lines"]
    data = coco([(1, "red.png")], [(1, "a red square")])
    (tmp_path / "c.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(data).encode())
    assert read_coco_captions(tmp_path / "c.json") == [("1", "red.png", ["a red square"])]


def test_json_errors_keep_line_and_column(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"images": [\n  {"id": 1,\n   "file_name": "a.png"\n  {"id": 2}]}')
    with pytest.raises(VlmquantError) as e:
        read_coco_captions(path)
    assert str(e.value) == f"{path}: not valid JSON at line 4 column 3 (Expecting ',' delimiter)"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(VlmquantError, match=r"line 2 column 1 \(Extra data\); for one JSON value per line name"):
        read_sharegpt(path)
    path.write_bytes(b'{"images": "\xff"}')
    with pytest.raises(VlmquantError, match=r"c.json: not UTF-8 text \(byte 12: invalid start byte\)$"):
        read_coco_captions(path)


# --- ShareGPT ----------------------------------------------------------------------------------
def conv(*pairs):
    return [{"from": who, "value": text} for who, text in pairs]


def sharegpt(tmp_path, rows, suffix=".json"):
    path = tmp_path / f"conv{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        write_json(path, rows)
    return path


def sharegpt_error(tmp_path, rows, suffix=".json"):
    path = sharegpt(tmp_path, rows, suffix)
    with pytest.raises(VlmquantError) as e:
        read_sharegpt(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    return msg[len(f"{path}: "):]


def test_sharegpt_system_turn_and_image_list(tmp_path):
    rows = [{"id": 5, "image": ["l.png", "r.png"], "conversations": conv(
        ("system", "Be brief."), ("human", "Left: <image>"), ("gpt", "A cat."),
        ("human", "<image>\nAnd this?"), ("gpt", "A dog."))},
        {"image": "x.png", "conversations": conv(("human", "What is it?"), ("gpt", " A mug. \n"))}]
    a, b = read_sharegpt(sharegpt(tmp_path, rows))
    assert a.sample_id == "5" and a.file_names == ("l.png", "r.png") and a.image_ids == ("5:0", "5:1")
    assert [(t.role, t.text, t.images) for t in a.turns] == [
        ("system", "Be brief.", ()), ("user", "Left:", (0,)), ("assistant", "A cat.", ()),
        ("user", "And this?", (1,)), ("assistant", "A dog.", ())]
    assert b.sample_id == "1" and b.image_ids == ("1",)  # the record's index
    assert [(t.role, t.text, t.images) for t in b.turns] == [("user", "What is it?", (0,)),
                                                             ("assistant", "A mug.", ())]


def test_sharegpt_image_only_human_turn(tmp_path):
    (s,) = read_sharegpt(sharegpt(tmp_path, [{"id": "a", "images": ["x.png"], "conversations": conv(
        ("human", "<image>"), ("gpt", "A mug."))}]))
    assert s.turns[0].text == "" and s.turns[0].images == (0,)


@pytest.mark.parametrize("turns,needle", [
    ([("human", "Hi"), ("gpt", "<image> A cat.")],
     "conversations[1]: <image> in a gpt turn; the image marker belongs in a human turn"),
    ([("human", "<image> What? <image>"), ("gpt", "A cat.")],
     "2 <image> markers in the human turns for 1 images; give one marker per image (or none for a single image)"),
    ([("human", "<image> What?"), ("gpt", "A cat."), ("human", "<image> Again?"), ("gpt", "A cat.")],
     "2 <image> markers in the human turns"),
    ([("human", "What?"), ("human", "Really?"), ("gpt", "A cat.")],
     "conversations[1]: a human turn here breaks the order"),
    ([("gpt", "A cat."), ("human", "What?")], "conversations[0]: a gpt turn here breaks the order"),
    ([("human", "What?"), ("system", "Be brief."), ("gpt", "A cat.")],
     "conversations[1]: a system turn here breaks the order"),
    ([("human", "What?"), ("gpt", "A cat."), ("human", "And?")], "the conversation must end with a gpt turn"),
    ([("human", "What?"), ("gpt", "  ")], "conversations[1].value: empty text"),
    ([("human", " "), ("gpt", "A cat.")], "conversations[0].value: empty text"),
    ([("human", "What? <|image_pad|>"), ("gpt", "A cat.")], "contains the image placeholder '<|image_pad|>'"),
    ([("human", "What?"), ("gpt", "A <video> cat.")], "contains the image placeholder '<video>'"),
    ([("human", "What?"), ("bot", "A cat.")], "conversations[1]: field 'from' must be one of"),
    ([], "field 'conversations' is empty"),
])
def test_sharegpt_bad_conversations(tmp_path, turns, needle):
    msg = sharegpt_error(tmp_path, [{"id": "a", "image": "x.png", "conversations": conv(*turns)}])
    assert msg.startswith("[0]") and needle in msg, msg


def test_sharegpt_images_without_markers(tmp_path):
    msg = sharegpt_error(tmp_path, [{"id": "a", "image": ["x.png", "y.png"],
                                     "conversations": conv(("human", "Compare."), ("gpt", "Same."))}])
    assert msg == "[0]: 0 <image> markers in the human turns for 2 images; give one marker per image"


@pytest.mark.parametrize("image,needle", [
    ([], "field 'image' is an empty list"), (None, "field 'image' must be str or list, got NoneType"),
    (["x.png", 3], "image[1] must be a file name (str), got int"),
    ("../x.png", "file name '../x.png' must be a relative path"),
    (["x.png", "/abs/y.png"], "field 'image'[1]: file name '/abs/y.png' must be a relative path"),
])
def test_sharegpt_bad_images(tmp_path, image, needle):
    msg = sharegpt_error(tmp_path, [{"id": "a", "image": image, "conversations": conv(("human", "Q"), ("gpt", "A"))}])
    assert needle in msg, msg


def test_sharegpt_duplicate_ids_name_both_lines(tmp_path):
    ok = conv(("human", "Q"), ("gpt", "A"))
    rows = [{"id": 1, "image": "a.png", "conversations": ok}, {"id": 2, "image": "b.png", "conversations": ok},
            {"id": "1", "image": "c.png", "conversations": ok}]
    path = sharegpt(tmp_path, rows, ".jsonl")
    assert sharegpt_error(tmp_path, rows, ".jsonl") == f"line 3: id '1' repeats {path}: line 1; ids must be unique"
    # a record without id takes its index, which may clash with an explicit id
    rows = [{"image": "a.png", "conversations": ok}, {"id": 0, "image": "b.png", "conversations": ok}]
    assert sharegpt_error(tmp_path, rows).startswith("[1]: id '0' repeats")


def test_sharegpt_jsonl_line_numbers_with_blank_lines(tmp_path):
    ok = json.dumps({"id": "a", "image": "a.png", "conversations": conv(("human", "Q"), ("gpt", "A"))})
    path = tmp_path / "conv.jsonl"
    path.write_text("\n".join([ok, "", "", ok.replace('"a"', '"b"'), '{"id": "c", "image": 4}']))
    with pytest.raises(VlmquantError) as e:
        read_sharegpt(path)
    assert str(e.value) == f"{path}: line 5: field 'image' must be str or list, got int"
    path.write_text("\n".join([ok, "", "", ok.replace('"a"', '"b"'), '{"id": "c", "image": "x.png"']))
    with pytest.raises(VlmquantError, match=r"conv.jsonl: line 5: not valid JSON at column 29"):
        read_sharegpt(path)


def test_duplicate_keys_are_refused(tmp_path):
    """json keeps the last of two equal keys without a word: a caption would silently move."""
    path = tmp_path / "c.json"
    path.write_text('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": '
                    '[{"image_id": 1, "caption": "a red square", "image_id": 2}]}')
    with pytest.raises(VlmquantError) as e:
        read_coco_captions(path)
    assert str(e.value) == f"{path}: an object has the key 'image_id' twice; keep one"
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b", "text": "c"}\n')
    with pytest.raises(VlmquantError, match=r"t.jsonl: line 2: an object has the key 'text' twice; keep one$"):
        read_text_corpus(path)


@pytest.mark.parametrize("row", [None, "text", ["a"]])
def test_sharegpt_record_not_an_object(tmp_path, row):
    assert sharegpt_error(tmp_path, [row]).startswith("[0]: expected an object with 'image' and 'conversations'")
