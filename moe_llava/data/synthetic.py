"""The synthetic demo dataset, written as real LLaVA-JSON files + an image folder.

Layout under `out_dir` (all paths in the JSON are relative to it):
  images/{train,heldout}_NNNNNN.png
  captions.json          stage I: human "<image>", gpt = caption (LLaVA-PT style)
  instruct.json          stage II/III: colour/shape/count/position/description Q&A, POPE-style yes/no
                         probes (all three negative strategies mixed), multi-turn and text-only samples
  pope_{random,popular,adversarial}.json   held-out yes/no probes, 50/50 per split, extra keys
                         "question_id", "label" ("yes"/"no"), "object", "split"
  open_questions.json    held-out short-answer questions, extra key "category" (color/shape/count/position)
  scenes.json            ground truth of every scene (id, split, image, objects ...)
  dataset.json           manifest: generator version, seed, sizes, vocabulary, files

Every scene and every question set has its own RNG, seeded by (seed, split, index, purpose): the output
is byte-for-byte reproducible, and the held-out scenes do not depend on n_train. Popularity and
co-occurrence statistics for POPE negatives come from the training scenes only.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np

from runtime.prompt import IMAGE_PLACEHOLDER

from .questions import (OPEN_KINDS, QA, TOTAL_COUNT_QUESTIONS, Kind, ObjectStats, PopeSplit, caption,
                        existence_question, pope_negatives, pope_questions, questions, text_only_qas)
from .scene import COLORS, POSITIONS, SHAPES, Scene, draw_scene, sample_scene

FORMAT_VERSION = 1
TURN_PROBS = (0.6, 0.25, 0.15)  # P(1, 2, 3 turns) in an instruction sample
KIND_WEIGHTS = {Kind.EXISTENCE: 0.30, Kind.COLOR: 0.15, Kind.SHAPE: 0.15, Kind.COUNT: 0.15,
                Kind.POSITION: 0.10, Kind.DESCRIPTION: 0.15}
INSTRUCT_PER_SCENE = 2
TEXT_ONLY_FRACTION = 0.03


class Split(IntEnum):  # the value seeds the RNG stream, so never renumber
    TRAIN = 0
    HELDOUT = 1
    TEXT = 2


class Purpose(IntEnum):
    SCENE = 0
    INSTRUCT = 1
    POPE = 2
    OPEN = 3
    SHUFFLE = 4


def rng_for(seed: int, split: Split, index: int, purpose: Purpose) -> np.random.Generator:
    return np.random.default_rng([seed, int(split), index, int(purpose)])


@dataclass(frozen=True)
class SyntheticDataset:
    root: Path
    images_dir: Path
    captions_json: Path
    instruct_json: Path
    pope_json: dict[PopeSplit, Path]
    open_questions_json: Path
    scenes_json: Path
    manifest_json: Path

    @classmethod
    def at(cls, root: Path) -> SyntheticDataset:
        """The file layout under `root` (whether or not it has been generated yet)."""
        root = Path(root)
        return cls(root, root / "images", root / "captions.json", root / "instruct.json",
                   {s: root / f"pope_{s.value}.json" for s in PopeSplit}, root / "open_questions.json",
                   root / "scenes.json", root / "dataset.json")


def scene_id(split: Split, index: int) -> str:
    return f"{split.name.lower()}_{index:06d}"


def image_path(sid: str) -> str:
    return f"images/{sid}.png"


def sample_scenes(seed: int, split: Split, n: int) -> list[Scene]:
    return [sample_scene(rng_for(seed, split, i, Purpose.SCENE)) for i in range(n)]


def conversation(turns: list[QA], with_image: bool) -> list[dict]:
    """LLaVA conversation list; the image goes at the start of the first human turn."""
    conv = []
    for i, qa in enumerate(turns):
        question = f"{IMAGE_PLACEHOLDER}\n{qa.question}" if with_image and i == 0 else qa.question
        conv += [{"from": "human", "value": question}, {"from": "gpt", "value": qa.answer}]
    return conv


def record(rid: str, turns: list[QA], image: str | None, **extra) -> dict:
    rec: dict = {"id": rid}
    if image is not None:
        rec["image"] = image
    rec["conversations"] = conversation(turns, image is not None)
    return {**rec, **extra}


def caption_record(sid: str, scene: Scene) -> dict:
    """Stage I: the human turn is only "<image>" (LLaVA's plain template drops the question)."""
    return {"id": sid, "image": image_path(sid), "conversations": [
        {"from": "human", "value": IMAGE_PLACEHOLDER}, {"from": "gpt", "value": caption(scene)}]}


def training_existence_qa(scene: Scene, stats: ObjectStats, rng: np.random.Generator) -> QA:
    """A POPE-style probe: 50 % present class, else a negative from a randomly chosen split strategy."""
    if rng.random() < 0.5:
        present = sorted(scene.shapes, key=SHAPES.index)
        return existence_question(present[rng.integers(len(present))], scene)
    split = list(PopeSplit)[rng.integers(len(PopeSplit))]
    return existence_question(pope_negatives(scene, 1, split, stats, rng)[0], scene)


def pick_question(scene: Scene, kind: Kind, rng: np.random.Generator) -> QA:
    """One question of `kind`; counts are half about all objects (1-4), half per class/colour (mostly 1)."""
    candidates = questions(scene, kind)
    if kind is Kind.COUNT and rng.random() < 0.5:
        candidates = [qa for qa in candidates if qa.question in TOTAL_COUNT_QUESTIONS]
    return candidates[rng.integers(len(candidates))]


def sample_qa(scene: Scene, kind: Kind, stats: ObjectStats, rng: np.random.Generator) -> QA:
    if kind is Kind.EXISTENCE:
        return training_existence_qa(scene, stats, rng)
    return pick_question(scene, kind, rng)


def instruct_turns(scene: Scene, stats: ObjectStats, rng: np.random.Generator) -> list[QA]:
    """1-3 turns of distinct questions, kinds drawn from KIND_WEIGHTS."""
    n_turns = int(rng.choice(len(TURN_PROBS), p=TURN_PROBS)) + 1
    kinds, weights = list(KIND_WEIGHTS), np.array(list(KIND_WEIGHTS.values()))
    turns: list[QA] = []
    for _ in range(8 * n_turns):  # bounded retries: a repeated question is redrawn
        qa = sample_qa(scene, kinds[rng.choice(len(kinds), p=weights)], stats, rng)
        if all(qa.question != t.question for t in turns):
            turns.append(qa)
        if len(turns) == n_turns:
            break
    return turns


def instruct_records(scenes: list[Scene], stats: ObjectStats, seed: int) -> list[dict]:
    records = []
    for i, scene in enumerate(scenes):
        sid, rng = scene_id(Split.TRAIN, i), rng_for(seed, Split.TRAIN, i, Purpose.INSTRUCT)
        records += [record(f"{sid}-{j}", instruct_turns(scene, stats, rng), image_path(sid))
                    for j in range(INSTRUCT_PER_SCENE)]
    records += text_only_records(round(TEXT_ONLY_FRACTION * len(records)), seed)
    order = rng_for(seed, Split.TRAIN, 0, Purpose.SHUFFLE).permutation(len(records))
    return [records[k] for k in order]


def text_only_records(n: int, seed: int) -> list[dict]:
    pool = text_only_qas()
    records = []
    for i in range(n):
        rng = rng_for(seed, Split.TEXT, i, Purpose.INSTRUCT)
        k = 1 + int(rng.random() < 0.3)  # some two-turn text chats
        turns = [pool[j] for j in rng.choice(len(pool), size=k, replace=False)]
        records.append(record(scene_id(Split.TEXT, i), turns, None))
    return records


def pope_records(scenes: list[Scene], split: PopeSplit, stats: ObjectStats, seed: int) -> list[dict]:
    records = []
    for i, scene in enumerate(scenes):
        sid = scene_id(Split.HELDOUT, i)
        # Same rng for every split: same positives (drawn first), split-specific negatives.
        for qa in pope_questions(scene, split, stats, rng_for(seed, Split.HELDOUT, i, Purpose.POPE)):
            records.append(record(f"{sid}-pope-{split.value}-{len(records)}", [qa], image_path(sid),
                                  question_id=len(records), label=qa.answer.lower(), object=qa.subject,
                                  split=split.value))
    return records


def open_question_records(scenes: list[Scene], seed: int) -> list[dict]:
    """One question per open kind and held-out scene; the gpt turn is the exact expected answer."""
    records = []
    for i, scene in enumerate(scenes):
        sid, rng = scene_id(Split.HELDOUT, i), rng_for(seed, Split.HELDOUT, i, Purpose.OPEN)
        for kind in OPEN_KINDS:
            qa = pick_question(scene, kind, rng)
            records.append(record(f"{sid}-{kind.value}", [qa], image_path(sid), category=kind.value))
    return records


def _write_json(path: Path, obj) -> None:
    """A JSON list one record per line (diff-able, and json's C encoder, which `indent` would disable)."""
    if isinstance(obj, list):
        path.write_text("[\n" + ",\n".join(json.dumps(row) for row in obj) + "\n]\n")
    else:
        path.write_text(json.dumps(obj, indent=1) + "\n")


def _prepare(ds: SyntheticDataset) -> None:
    """Start from an empty images/ folder; replace a previous synthetic dataset, never foreign files."""
    if ds.images_dir.exists():
        if not ds.manifest_json.exists() and any(ds.images_dir.iterdir()):
            raise FileExistsError(f"{ds.images_dir} is not empty and {ds.root} is not a synthetic dataset")
        shutil.rmtree(ds.images_dir)
    ds.images_dir.mkdir(parents=True)


def _write_images(ds: SyntheticDataset, split: Split, scenes: list[Scene]) -> None:
    for i, scene in enumerate(scenes):
        draw_scene(scene).save(ds.root / image_path(scene_id(split, i)), format="PNG")


def _scene_rows(split: Split, scenes: list[Scene]) -> list[dict]:
    return [{"id": scene_id(split, i), "split": split.name.lower(), "image": image_path(scene_id(split, i)),
             **scene.to_dict()} for i, scene in enumerate(scenes)]


def _manifest(ds: SyntheticDataset, seed: int, n_train: int, n_heldout: int, counts: dict) -> dict:
    files = [ds.captions_json, ds.instruct_json, *ds.pope_json.values(), ds.open_questions_json, ds.scenes_json]
    return {"format_version": FORMAT_VERSION, "generator": __name__, "seed": seed, "n_train": n_train,
            "n_heldout": n_heldout, "pope_object": "shape class", "shapes": list(SHAPES),
            "colors": list(COLORS), "positions": list(POSITIONS.values()), "records": counts,
            "files": sorted(p.relative_to(ds.root).as_posix() for p in files) + ["images/"]}


def generate_dataset(out_dir: Path, n_train: int, n_heldout: int, seed: int = 0) -> SyntheticDataset:
    """Draw n_train + n_heldout scenes and write the dataset under out_dir (see module docstring)."""
    ds = SyntheticDataset.at(out_dir)
    _prepare(ds)
    train, heldout = sample_scenes(seed, Split.TRAIN, n_train), sample_scenes(seed, Split.HELDOUT, n_heldout)
    stats = ObjectStats.from_scenes(train or heldout)
    _write_images(ds, Split.TRAIN, train)
    _write_images(ds, Split.HELDOUT, heldout)
    outputs = {ds.captions_json: [caption_record(scene_id(Split.TRAIN, i), s) for i, s in enumerate(train)],
               ds.instruct_json: instruct_records(train, stats, seed),
               ds.open_questions_json: open_question_records(heldout, seed),
               ds.scenes_json: _scene_rows(Split.TRAIN, train) + _scene_rows(Split.HELDOUT, heldout)}
    outputs |= {ds.pope_json[s]: pope_records(heldout, s, stats, seed) for s in PopeSplit}
    for path, rows in outputs.items():
        _write_json(path, rows)
    counts = {p.relative_to(ds.root).as_posix(): len(rows) for p, rows in outputs.items()}
    _write_json(ds.manifest_json, _manifest(ds, seed, n_train, n_heldout, counts))
    return ds


def load_scenes(ds: SyntheticDataset, split: str | None = None) -> dict[str, Scene]:
    """Ground-truth scenes by id (optionally only "train" or "heldout")."""
    rows = json.loads(ds.scenes_json.read_text())
    return {r["id"]: Scene.from_dict(r) for r in rows if split is None or r["split"] == split}
