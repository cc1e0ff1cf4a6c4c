import json

import pytest
import torch

from moe_llava.image_processing import HFImageProcessor
from moe_llava.train.dataset import LlavaCollator, LlavaJsonDataset, record_turns
from runtime.errors import UserError
from runtime.prompt import END_OF_TEXT, IGNORE_INDEX, IMAGE_TOKEN_INDEX, Template
from tests.tiny import TINY_CLIP_PROCESSOR


def _dataset(records, tokenizer, folder=None, template=Template.STABLELM, max_length=512):
    return LlavaJsonDataset(records, folder, tokenizer, HFImageProcessor(TINY_CLIP_PROCESSOR), template, max_length)


def _conv(*pairs):
    return [{"from": role, "value": v} for q, a in pairs for role, v in (("human", q), ("gpt", a))]


def _supervised(tokenizer, item) -> list[str]:
    """The supervised spans of an item, decoded, one string per contiguous run of labels."""
    runs, current = [], []
    for label in item["labels"].tolist() + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
    return runs


def test_only_answers_are_supervised_multi_turn(tiny_data, tokenizer):
    record = {"id": "r", "image": "images/train_000000.png",
              "conversations": _conv(("<image>\nWhat color is the circle?", "red"), ("How many?", "2"))}
    item = _dataset([record], tokenizer, tiny_data.root)[0]
    assert _supervised(tokenizer, item) == [" red" + END_OF_TEXT, " 2" + END_OF_TEXT]
    ids = item["input_ids"].tolist()
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and item["pixel_values"].shape == (3, 28, 28)
    assert item["labels"][ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX


def test_image_placeholder_moves_to_the_front(tokenizer):
    record = {"id": "r", "image": "x.png", "conversations": _conv(("What is this? <image>", "a star"))}
    assert record_turns(record, Template.STABLELM)[0].question == "<image>\nWhat is this?"
    plain = record_turns(record, Template.PLAIN)
    assert plain[0].question == "<image>" and plain[0].answer == "a star"


def test_text_only_sample(tokenizer):
    record = {"id": "t", "conversations": _conv(("How many sides does a square have?", "4"))}
    item = _dataset([record], tokenizer)[0]
    assert item["pixel_values"] is None and IMAGE_TOKEN_INDEX not in item["input_ids"].tolist()
    assert _supervised(tokenizer, item) == [" 4" + END_OF_TEXT]


def test_plain_template_supervises_the_caption(tiny_data, tokenizer):
    records = json.loads(tiny_data.captions_json.read_text())[:1]
    item = _dataset(records, tokenizer, tiny_data.root, Template.PLAIN)[0]
    assert item["input_ids"][0] == IMAGE_TOKEN_INDEX
    assert _supervised(tokenizer, item) == [records[0]["conversations"][1]["value"] + "\n"]


def test_collator_mixes_text_only_and_image_samples(tiny_data, tokenizer):
    records = json.loads(tiny_data.instruct_json.read_text())
    image_recs = [r for r in records if "image" in r][:2]
    text_rec = {"id": "t", "conversations": _conv(("Name a shape with three sides.", "triangle"))}
    ds = _dataset([image_recs[0], text_rec, image_recs[1]], tokenizer, tiny_data.root)
    items = [ds[i] for i in range(3)]
    batch = LlavaCollator(pad_token_id=0)(items)
    assert batch["pixel_values"].shape == (2, 3, 28, 28)
    assert torch.equal(batch["pixel_values"][1], items[2]["pixel_values"])  # in sample order
    lengths = [len(it["input_ids"]) for it in items]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][1, lengths[1]:] == IGNORE_INDEX).all()
    assert LlavaCollator(0)([items[1]])["pixel_values"] is None


def test_truncation_drops_an_image_whose_slot_is_cut(tiny_data, tokenizer):
    record = {"id": "r", "image": "images/train_000000.png",
              "conversations": _conv(("Describe the image. <image>", "A red circle."))}
    full = _dataset([record], tokenizer, tiny_data.root)[0]
    slot = full["input_ids"].tolist().index(IMAGE_TOKEN_INDEX)
    cut = _dataset([record], tokenizer, tiny_data.root, max_length=slot)[0]
    assert len(cut["input_ids"]) == slot and cut["pixel_values"] is None
    assert len(_dataset([record], tokenizer, tiny_data.root, max_length=slot + 3)[0]["input_ids"]) == slot + 3


def test_image_errors_name_the_file(tmp_path, tokenizer):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for name in ("missing.png", "broken.png"):
        record = {"id": "r7", "image": name, "conversations": _conv(("<image>\nhi", "ok"))}
        with pytest.raises(UserError, match=name):
            _dataset([record], tokenizer, tmp_path)[0]


@pytest.mark.parametrize("conv", [_conv(("q", "a"))[:1], [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]])
def test_malformed_conversations_are_user_errors(conv, tokenizer):
    with pytest.raises(UserError, match="alternate"):
        _dataset([{"id": "bad", "conversations": conv}], tokenizer)[0]


def test_text_only_record_with_placeholder_is_rejected(tokenizer):
    with pytest.raises(UserError, match="text-only"):
        _dataset([{"id": "x", "conversations": _conv(("<image>\nq", "a"))}], tokenizer)[0]
