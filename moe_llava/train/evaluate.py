"""Evaluation on the held-out synthetic scenes: POPE (3 splits), open questions, routing statistics.

Answers come from greedy generation with the PyTorch model (the honest version, not Yes/No scoring):
the prompt is built exactly as `moe-run` builds it. POPE parsing: an answer starting with "yes" is a
yes, starting with "no" a no; anything else is counted as `other` and is wrong (it is neither a
positive prediction nor a correct negative). Open questions: exact match after lower-casing and
stripping whitespace and a final period. Routing: the top-k experts every prompt token (prefill,
image and text apart) is sent to, per MoE layer.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from runtime.prompt import build_prompt, tokenize_with_image

from ..data import PopeSplit, SyntheticDataset
from ..loading import LoadedModel
from .dataset import load_image, read_records
from .generate import RoutingRecorder, greedy_generate


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def yes_no(text: str) -> str:
    t = normalise(text)
    return "yes" if t.startswith("yes") else "no" if t.startswith("no") else "other"


class Answerer:
    """Greedy answers to single-turn LLaVA-JSON records, in batches, images cached by path."""

    def __init__(self, loaded: LoadedModel, image_folder: Path, batch_size: int = 32,
                 recorder: RoutingRecorder | None = None, progress: bool = True):
        self.loaded, self.image_folder, self.batch_size = loaded, Path(image_folder), batch_size
        self.recorder, self.progress = recorder, progress
        self._pixels: dict[str, torch.Tensor] = {}

    def prompt_ids(self, record: dict) -> list[int]:
        question = record["conversations"][0]["value"]
        prompt = build_prompt(self.loaded.template, question, with_image="image" in record)
        return tokenize_with_image(self.loaded.tokenizer, prompt, self.loaded.bos_token_id)

    def pixels(self, record: dict) -> torch.Tensor:
        name = record["image"]
        if name not in self._pixels:
            image = load_image(self.image_folder / name, record.get("id", "?"))
            self._pixels[name] = torch.from_numpy(self.loaded.image_processor(image))
        return self._pixels[name]

    def __call__(self, records: list[dict], max_new_tokens: int, desc: str = "") -> list[str]:
        answers = []
        for i in tqdm(range(0, len(records), self.batch_size), desc=desc, disable=not self.progress, leave=False):
            batch = records[i:i + self.batch_size]
            images = [self.pixels(r) for r in batch if "image" in r]
            out = greedy_generate(self.loaded.model, [self.prompt_ids(r) for r in batch],
                                  torch.stack(images) if images else None, self.loaded.eos_token_id,
                                  max_new_tokens, self.recorder)
            answers += [self.loaded.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out]
        return answers


def pope_metrics(labels: list[str], answers: list[str]) -> dict:
    preds = [yes_no(a) for a in answers]
    tp = sum(p == "yes" and y == "yes" for p, y in zip(preds, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(preds, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(preds, labels))
    fn = sum(p != "yes" and y == "yes" for p, y in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(labels)
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": preds.count("yes") / n, "other": preds.count("other"), "n": n}


def open_metrics(records: list[dict], answers: list[str]) -> dict:
    by_cat: dict[str, list[bool]] = {}
    for rec, ans in zip(records, answers):
        ok = normalise(ans) == normalise(rec["conversations"][1]["value"])
        by_cat.setdefault(rec.get("category", "all"), []).append(ok)
    hits = [ok for oks in by_cat.values() for ok in oks]
    return {"accuracy": sum(hits) / max(len(hits), 1), "n": len(hits),
            "per_category": {c: sum(oks) / len(oks) for c, oks in sorted(by_cat.items())}}


def evaluate(loaded: LoadedModel, data_root: Path, batch_size: int = 32, limit: int | None = None,
             progress: bool = True) -> dict:
    """{"pope": {split: metrics}, "open": metrics, "routing": per-layer expert loads (empty if dense)}."""
    ds = SyntheticDataset.at(data_root)
    recorder = RoutingRecorder(loaded.model) if loaded.model.moe_layers() else None
    answer = Answerer(loaded, ds.root, batch_size, recorder, progress)
    result: dict = {"pope": {}}
    try:
        for split in PopeSplit:
            records = read_records(ds.pope_json[split])[:limit]
            answers = answer(records, max_new_tokens=4, desc=f"POPE {split.value}")
            result["pope"][split.value] = pope_metrics([r["label"] for r in records], answers)
        records = read_records(ds.open_questions_json)[:limit]
        result["open"] = open_metrics(records, answer(records, max_new_tokens=8, desc="open questions"))
        result["routing"] = recorder.summary() if recorder else {}
    finally:
        if recorder:
            recorder.close()
    return result


def format_report(result: dict) -> str:
    lines = ["POPE         acc    prec   recall  F1     yes    n",
             *(f"{split:<12} {m['accuracy']:.3f}  {m['precision']:.3f}  {m['recall']:.3f}   {m['f1']:.3f}  "
               f"{m['yes_ratio']:.3f}  {m['n']}" for split, m in result["pope"].items())]
    op = result["open"]
    cats = "  ".join(f"{c} {a:.3f}" for c, a in op["per_category"].items())
    lines += [f"open questions: accuracy {op['accuracy']:.3f} (n={op['n']}; {cats})"]
    lines += routing_table(result.get("routing") or {})
    return "\n".join(lines)


def routing_table(routing: dict) -> list[str]:
    if not routing:
        return ["routing: dense model (no MoE layers)"]
    e = routing["num_experts"]
    head = f"routing (share of top-{routing['top_k']} assignments)  layer  tokens  " + \
        "  ".join(f"e{i:<4}" for i in range(e))
    rows = [head]
    for layer, per in routing["load"].items():
        for modality, shares in per.items():
            rows.append(f"{'':<44}{layer:>5}  {modality:<6}  " + "  ".join(f"{s:.3f}" for s in shares))
    return rows


def write_json(result: dict, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
