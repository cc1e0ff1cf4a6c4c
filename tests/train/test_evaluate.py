import json

import pytest
import torch

from moe_llava.inference import pipeline_for
from moe_llava.loading import load_pretrained
from moe_llava.train.evaluate import Answerer, evaluate, open_metrics, pope_metrics, yes_no
from moe_llava.train.generate import IMAGE, TEXT, RoutingRecorder, greedy_generate
from tests.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def moe_loaded(tmp_path_factory):
    directory = tmp_path_factory.mktemp("moe")
    write_tiny_checkpoint(directory, moe=True, seed=2)
    return load_pretrained(directory)


def test_pope_metrics_by_hand():
    labels = ["yes", "yes", "no", "no", "yes"]
    answers = ["Yes", "No.", "yes, there is", "No", "maybe"]
    m = pope_metrics(labels, answers)
    # tp=1 fp=1 tn=1 fn=2 (the unparsable answer to a yes-question is a miss)
    assert m["precision"] == 0.5 and m["recall"] == pytest.approx(1 / 3) and m["accuracy"] == 0.4
    assert m["f1"] == pytest.approx(0.4) and m["yes_ratio"] == 0.4 and m["other"] == 1
    assert [yes_no(a) for a in ("Yes.", " no", "Nope", "n/a")] == ["yes", "no", "no", "other"]


def test_open_metrics():
    records = [{"conversations": [{}, {"value": v}], "category": c} for v, c in (("red", "color"), ("2", "count"))]
    m = open_metrics(records, ["Red.", "3"])
    assert m["accuracy"] == 0.5 and m["per_category"] == {"color": 1.0, "count": 0.0}


def _pipeline_answer(loaded, image, question, max_new_tokens):
    return pipeline_for(loaded).generate(image, question, max_new_tokens=max_new_tokens).token_ids


def test_batched_greedy_equals_moe_run_one_by_one(moe_loaded, tiny_data):
    records = json.loads(tiny_data.open_questions_json.read_text())[:3]
    records.append({"id": "t", "conversations": [{"from": "human", "value": "How many sides does a star have?"},
                                                 {"from": "gpt", "value": "10"}]})
    answer = Answerer(moe_loaded, tiny_data.root, progress=False)
    images = [answer.pixels(r) for r in records if "image" in r]
    batched = greedy_generate(moe_loaded.model, [answer.prompt_ids(r) for r in records], torch.stack(images),
                              moe_loaded.eos_token_id, max_new_tokens=6)
    for rec, ids in zip(records, batched):
        image = tiny_data.root / rec["image"] if "image" in rec else None
        question = rec["conversations"][0]["value"].replace("<image>\n", "")
        assert ids == _pipeline_answer(moe_loaded, image, question, 6)
    assert any(len(ids) > 1 for ids in batched)


def test_routing_recorder_counts_prompt_tokens_by_modality(moe_loaded, tiny_data):
    records = json.loads(tiny_data.pope_json["random"].read_text())[:2]
    answer = Answerer(moe_loaded, tiny_data.root, progress=False)
    recorder = RoutingRecorder(moe_loaded.model)
    prompts = [answer.prompt_ids(r) for r in records]
    greedy_generate(moe_loaded.model, prompts, torch.stack([answer.pixels(r) for r in records]),
                    moe_loaded.eos_token_id, 3, recorder)
    recorder.close()
    visual = 16  # 28 px / patch 7 -> 4 x 4
    assert recorder.tokens == {"image": 2 * visual, "text": sum(len(p) - 1 for p in prompts)}
    summary = recorder.summary()
    assert summary["moe_layers"] == [0, 2] and summary["top_k"] == 2
    for per in summary["load"].values():
        assert sum(per["image"]) == pytest.approx(1, abs=1e-3) and sum(per["text"]) == pytest.approx(1, abs=1e-3)
    assert int(recorder.counts[0]["image"].sum()) == 2 * 2 * visual  # k = 2 assignments per token
    assert (TEXT, IMAGE) == (1, 2)


def test_evaluate_structure(moe_loaded, tiny_data):
    result = evaluate(moe_loaded, tiny_data.root, batch_size=8, limit=6, progress=False)
    assert set(result["pope"]) == {"random", "popular", "adversarial"}
    for m in result["pope"].values():
        assert {"accuracy", "precision", "recall", "f1", "yes_ratio", "n"} <= set(m) and m["n"] == 6
    assert result["open"]["n"] == 6 and set(result["routing"]["load"]) == {"0", "2"}
