"""Label spans come from the conversation's structure: an answer that repeats words of the question is
marked in the assistant turn, never in the question, for every family; `labels: turn` marks the whole turn."""
import pytest
import torch

from vlmquant.data.calib import build_calib, read_calib
from vlmquant.demo.dataset import write_demo_data
from vlmquant.errors import VlmquantError
from vlmquant.models import family_names
from vlmquant.models.tiny import build_demo_model

from conftest import open_demo
from test_calib import coco_cfg

# (question, answer): the answer's tokens also occur earlier in the prompt
REPEATS = [("Is it red or teal? Answer with one word.", "teal"),
           ("Yes or no? Is there a galaxy?", "Yes"),
           ("There are 2 or 3 cards. How many?", "2")]


@pytest.fixture(scope="module")
def image_row(tmp_path_factory):
    d = tmp_path_factory.mktemp("labels")
    build_calib(coco_cfg(write_demo_data(d / "data"), n_samples=2), d / "c.parquet")
    return read_calib(d / "c.parquet")


@pytest.fixture(scope="module", params=family_names())
def model(request, tmp_path_factory):
    family = request.param
    ref = open_demo(build_demo_model(tmp_path_factory.mktemp(family) / "model", family), family)
    return ref, ref.processor(), ref.config()


def conversation(rows, qa):
    """One row: for each (question, answer), a user turn with the next image and an assistant turn."""
    turns = []
    for k, (q, a) in enumerate(qa):
        turns += [{"role": "user", "text": q, "images": [k]}, {"role": "assistant", "text": a, "images": []}]
    n = len(qa)
    return {"sample_id": "s1", "image_ids": [r["image_ids"][0] for r in rows[:n]],
            "file_names": [r["file_names"][0] for r in rows[:n]], "images": [r["images"][0] for r in rows[:n]],
            "image_sha256": [r["image_sha256"][0] for r in rows[:n]], "turns": turns}


def runs(mask):
    """[(start, end)] of the True runs of a 1-D bool tensor."""
    edges = torch.diff(torch.cat([torch.tensor([0]), mask.int(), torch.tensor([0])])).nonzero()[:, 0].tolist()
    return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("question, answer", REPEATS)
def test_answer_marked_in_the_assistant_turn(model, image_row, question, answer):
    ref, processor, config = model
    enc = ref.adapter.encode(processor, config, conversation(image_row, [(question, answer)]))
    ids, cap = enc["input_ids"][0], enc["caption_mask"][0]
    (start, end), = runs(cap)
    assert processor.tokenizer.decode(ids[start:end]).strip() == answer
    # the whole question (which holds the answer's words) comes before the span
    assert start > int(enc["vision_mask"][0].nonzero()[-1])
    assert question in processor.tokenizer.decode(ids[:start])
    assert torch.equal(enc["labels"][0] != -100, cap)


def test_each_turn_marks_its_own_answer(model, image_row):
    """Two turns with the same answer: two spans, each after its own question."""
    ref, processor, config = model
    row = conversation(image_row, [("Yes or no? Is it dark?", "Yes"), ("Yes or no? Is it bright?", "Yes")])
    enc = ref.adapter.encode(processor, config, row)
    ids, cap, vision = enc["input_ids"][0], enc["caption_mask"][0], enc["vision_mask"][0]
    spans = runs(cap)
    assert [processor.tokenizer.decode(ids[a:b]).strip() for a, b in spans] == ["Yes", "Yes"]
    second_image = runs(vision)[-1][0]
    assert spans[0][1] <= second_image < spans[1][0]


def test_turn_labels_cover_the_template_tokens(model, image_row):
    ref, processor, config = model
    row = conversation(image_row, [("Is it red or teal?", "teal")])
    answer = ref.adapter.encode(processor, config, row)["caption_mask"][0]
    enc = ref.adapter.encode(processor, config, row, labels="turn")
    turn, ids = enc["caption_mask"][0], enc["input_ids"][0]
    (start, end), = runs(turn)
    assert (turn | answer).equal(turn) and int(turn.sum()) > int(answer.sum())
    text = processor.apply_chat_template(ref.adapter.messages(row["turns"]), tokenize=False)
    head = processor.apply_chat_template(ref.adapter.messages(row["turns"][:1]), tokenize=False)
    # the turn's tokens decode to what the template wrote for the assistant turn
    assert processor.tokenizer.decode(ids[start:end]).strip() == text[len(head):].strip()  # LLaVA: a space straddles
    assert end == len(ids) and not enc["vision_mask"][0][start:].any()


def test_qwen2_vl_turn_labels_add_the_template_tokens(image_row, tmp_path):
    """Qwen2-VL: '<|im_start|>assistant\\n' before the answer and '<|im_end|>\\n' after it."""
    ref = open_demo(build_demo_model(tmp_path / "m"))
    processor, config = ref.processor(), ref.config()
    row = conversation(image_row, [("Is it red or teal?", "teal")])
    answer = ref.adapter.encode(processor, config, row)["caption_mask"][0]
    enc = ref.adapter.encode(processor, config, row, labels="turn")
    ids = enc["input_ids"][0]
    assert processor.tokenizer.decode(ids[enc["caption_mask"][0]]) == "<|im_start|>assistant\nteal<|im_end|>\n"
    assert int(enc["caption_mask"][0].sum()) - int(answer.sum()) == 7  # the 7 of issue 18


def test_template_without_the_answer_is_refused(model, image_row):
    ref, processor, config = model

    class Dropping:
        """The processor with a chat template that leaves the assistant's text out."""
        def __init__(self, p):
            self.p = p

        def __getattr__(self, name):
            return getattr(self.p, name)

        def __call__(self, *a, **k):
            return self.p(*a, **k)

        def apply_chat_template(self, messages, **k):
            return self.p.apply_chat_template([m if m["role"] != "assistant" else {**m, "content": [
                {"type": "text", "text": "ok"}]} for m in messages], **k)

    with pytest.raises(VlmquantError, match=r"sample s1: .* assistant turn 1's text 'teal'"):
        ref.adapter.encode(Dropping(processor), config, conversation(image_row, [("Red or teal?", "teal")]))
