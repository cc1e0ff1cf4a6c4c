"""LLaVA-JSON training data: records -> (input_ids, labels, pixel_values), and the batch collator.

A record is `{"id", "image"?: "rel/path", "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}`.
As in the reference: the `<image>` placeholder is moved to the front of the first human turn ("<image>\n"
+ question); the plain template (stage I) keeps only "<image>" + the first answer; the image slot becomes
one IMAGE_TOKEN_INDEX in input_ids and the model splices the visual tokens there. Labels cover the
assistant turns only. Records without "image" are text-only and mix freely with image records in a batch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from runtime.errors import UserError
from runtime.prompt import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, Template, Turn, tokenize_conversation

ROLES = ("human", "gpt")


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"training data {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(records, list) or not records:
        raise UserError(f"{path}: expected a non-empty LLaVA-JSON list of records")
    return records


def record_turns(record: dict, template: Template) -> list[Turn]:
    """The conversation as Turns; the image placeholder leads the first question (if the record has an image)."""
    conv = record.get("conversations") or []
    rid = record.get("id", "?")
    roles = [c.get("from") for c in conv]
    if len(conv) < 2 or len(conv) % 2 or any(r != ROLES[i % 2] for i, r in enumerate(roles)):
        raise UserError(f"record {rid}: conversations must alternate human/gpt turns, got {roles}")
    values = [c["value"] for c in conv]
    has_image = "image" in record
    if not has_image and any(IMAGE_PLACEHOLDER in v for v in values):
        raise UserError(f"record {rid}: text-only record (no 'image') contains {IMAGE_PLACEHOLDER}")
    questions = [v.replace(IMAGE_PLACEHOLDER, "").strip() if has_image else v for v in values[0::2]]
    if Template(template) is Template.PLAIN:  # stage I: "<image>" + caption, the question is dropped
        return [Turn(IMAGE_PLACEHOLDER if has_image else questions[0], values[1])]
    if has_image:
        questions[0] = IMAGE_PLACEHOLDER + ("\n" + questions[0] if questions[0] else "")
    return [Turn(q, a) for q, a in zip(questions, values[1::2])]


def load_image(path: Path, rid: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"record {rid}: image {path} does not exist (check --image-folder)") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"record {rid}: cannot read image {path} ({e})") from None


@dataclass(frozen=True)
class TokenCounts:
    lengths: list[int]     # per record: sequence length with each image slot counted as its visual tokens
    supervised: list[int]  # per record: answer tokens (labels other than IGNORE_INDEX)

    @property
    def mean_supervised(self) -> float:
        return sum(self.supervised) / len(self.supervised)


class LlavaJsonDataset(Dataset):
    """Items: {"input_ids": [S], "labels": [S], "pixel_values": [3,R,R] or None}. `image_tokens`: the visual
    tokens that replace one image slot in the model (used only to count lengths)."""

    def __init__(self, records: list[dict] | str | Path, image_folder: str | Path | None, tokenizer,
                 image_processor, template: Template, max_length: int, bos_token_id: int | None = None,
                 cache_images: bool = False, image_tokens: int = 1):
        self.records = read_records(records) if isinstance(records, (str, Path)) else records
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.template, self.max_length, self.bos_token_id = Template(template), max_length, bos_token_id
        self.image_tokens = image_tokens
        self._cache: dict[str, torch.Tensor] | None = {} if cache_images else None
        self._counts: TokenCounts | None = None

    def __len__(self) -> int:
        return len(self.records)

    def tokens(self, i: int) -> tuple[list[int], list[int]]:
        record = self.records[i]
        ids, labels = tokenize_conversation(self.tokenizer, self.template, record_turns(record, self.template),
                                            self.bos_token_id)
        return ids[: self.max_length], labels[: self.max_length]

    def __getitem__(self, i: int) -> dict:
        ids, labels = self.tokens(i)
        # An image whose slot was truncated away would have nowhere to go: drop it with its slot.
        pixels = self.pixel_values(self.records[i]) if IMAGE_TOKEN_INDEX in ids else None
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixels}

    def token_counts(self) -> TokenCounts:
        """Lengths and answer tokens of every record, from the text alone (no image is read); computed once."""
        if self._counts is None:
            lengths, supervised = [], []
            for i in range(len(self)):
                ids, labels = self.tokens(i)
                lengths.append(len(ids) + ids.count(IMAGE_TOKEN_INDEX) * (self.image_tokens - 1))
                supervised.append(sum(label != IGNORE_INDEX for label in labels[1:]))
            self._counts = TokenCounts(lengths, supervised)
        return self._counts

    def pixel_values(self, record: dict) -> torch.Tensor:
        name = record["image"]
        if self._cache is not None and name in self._cache:
            return self._cache[name]
        if self.image_folder is None:
            raise UserError(f"record {record.get('id', '?')} has an image but no --image-folder was given")
        pixels = torch.from_numpy(self.image_processor(load_image(self.image_folder / name, record.get("id", "?"))))
        if self._cache is not None:
            self._cache[name] = pixels
        return pixels


@dataclass
class LlavaCollator:
    """Right-pads input_ids (pad_token_id) and labels (IGNORE_INDEX); stacks the images of the batch in
    sample order (the model consumes them slot by slot), pixel_values=None for an all-text batch."""
    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        length = max(len(it["input_ids"]) for it in items)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)    # [B,S]
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)            # [B,S]
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)                 # [B,S]
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = it["input_ids"], it["labels"], 1
        images = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "pixel_values": torch.stack(images) if images else None}                      # [N,3,R,R]
