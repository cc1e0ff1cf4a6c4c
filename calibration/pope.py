"""POPE F1 of any Pipeline (runtime export or PyTorch) on held-out synthetic probes.

The prompt is built by the Pipeline exactly as `moe-run` builds it; answers are greedy, 4 new tokens, and
scored with moe-eval's own parser and metrics (moe_llava/train/evaluate.py: an answer starting with
"yes" is yes, with "no" is no, anything else is wrong).
"""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from runtime.preprocess import load_image

MAX_NEW_TOKENS = 4


def pope_answers(pipeline, records: list[dict], image_root: Path) -> list[str]:
    answers, images = [], {}
    for record in tqdm(records, desc="validating: POPE probes", unit="probe", leave=False):
        name = record["image"]
        if name not in images:
            images = {name: load_image(Path(image_root) / name)}  # records come grouped by image
        question = record["conversations"][0]["value"]
        answers.append(pipeline.generate(images[name], question, MAX_NEW_TOKENS).text)
    return answers


def pope_f1(pipeline, records: list[dict], image_root: Path) -> dict:
    """moe-eval's POPE metrics (accuracy, precision, recall, f1, yes_ratio, other, n) of `pipeline`."""
    from moe_llava.train.evaluate import pope_metrics
    return pope_metrics([r["label"] for r in records], pope_answers(pipeline, records, image_root))
