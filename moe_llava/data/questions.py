"""Text for synthetic scenes: captions, short-answer questions and POPE object-existence probes.

Answers are short and canonical so a small model can learn them and evaluation can string-match:
colours and shapes are lower-case vocabulary words ("red", "circle"), positions are POSITIONS values
("top left"), counts are digits ("2"), existence answers are "Yes" / "No".

POPE "object" = shape class (8 classes; colour is an attribute, not an object). Negatives for an
image are shape classes absent from it, chosen by split:
  random       uniformly among the absent classes;
  popular      the absent classes that occur in the most training images;
  adversarial  the absent classes that co-occur most often (in training images) with the present ones.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum
from itertools import permutations

import numpy as np

from .scene import COLORS, PLURALS, SHAPES, Scene, SceneObject


class Kind(str, Enum):
    COLOR = "color"
    SHAPE = "shape"
    COUNT = "count"
    POSITION = "position"
    EXISTENCE = "existence"
    DESCRIPTION = "description"


OPEN_KINDS = (Kind.COLOR, Kind.SHAPE, Kind.COUNT, Kind.POSITION)


class PopeSplit(str, Enum):
    RANDOM = "random"
    POPULAR = "popular"
    ADVERSARIAL = "adversarial"


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: Kind
    subject: str | None = None  # the shape class an existence question asks about


YES, NO = "Yes", "No"
TOTAL_COUNT_QUESTIONS = ("How many objects are there?", "How many shapes are in the image?")
DESCRIBE = ("Describe the image briefly.", "What is in the image?", "Give a short description of the image.")
PREPOSITIONS = {"top": "at the", "bottom": "at the", "left": "on the", "right": "on the", "center": "in the"}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def where(position: str) -> str:
    """'top left' -> 'at the top left', 'center' -> 'in the center'."""
    return f"{PREPOSITIONS[position.split()[0]]} {position}"


def caption(scene: Scene) -> str:
    """'A red circle on the left and a blue square at the top right.' (objects in reading order)."""
    parts = [f"{article(o.color)} {o.color} {o.shape} {where(o.position)}" for o in scene.objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def _unique(scene: Scene, key) -> list[SceneObject]:
    counts = Counter(key(o) for o in scene.objects)
    return [o for o in scene.objects if counts[key(o)] == 1]


def color_questions(scene: Scene) -> list[QA]:
    qs = [QA(f"What color is the object {where(o.position)}?", o.color, Kind.COLOR) for o in scene.objects]
    qs += [QA(f"What color is the {o.shape}?", o.color, Kind.COLOR) for o in _unique(scene, lambda o: o.shape)]
    return qs


def shape_questions(scene: Scene) -> list[QA]:
    qs = [QA(f"What shape is {where(o.position)}?", o.shape, Kind.SHAPE) for o in scene.objects]
    qs += [QA(f"What shape is the {o.color} object?", o.shape, Kind.SHAPE)
           for o in _unique(scene, lambda o: o.color)]
    return qs


def count_questions(scene: Scene) -> list[QA]:
    n = str(len(scene.objects))
    qs = [QA(q, n, Kind.COUNT) for q in TOTAL_COUNT_QUESTIONS]
    # Present classes only: absent ones ("0") are what the existence questions cover.
    shapes = Counter(o.shape for o in scene.objects)
    qs += [QA(f"How many {PLURALS[s]} are there?", str(n), Kind.COUNT) for s, n in shapes.items()]
    colors = Counter(o.color for o in scene.objects)
    qs += [QA(f"How many {c} objects are there?", str(colors[c]), Kind.COUNT) for c in colors]
    return qs


def position_questions(scene: Scene) -> list[QA]:
    # (colour, shape) is unique within a scene by construction (scene._sample_colors).
    return [QA(f"Where is the {o.color} {o.shape}?", o.position, Kind.POSITION) for o in scene.objects]


def existence_question(shape: str, scene: Scene) -> QA:
    return QA(f"Is there {article(shape)} {shape} in the image?", YES if shape in scene.shapes else NO,
              Kind.EXISTENCE, shape)


def questions(scene: Scene, kind: Kind) -> list[QA]:
    """Every question of one kind this scene answers unambiguously (existence: one per shape class)."""
    if kind is Kind.DESCRIPTION:
        return [QA(q, caption(scene), kind) for q in DESCRIBE]
    if kind is Kind.EXISTENCE:
        return [existence_question(s, scene) for s in SHAPES]
    return {Kind.COLOR: color_questions, Kind.SHAPE: shape_questions, Kind.COUNT: count_questions,
            Kind.POSITION: position_questions}[kind](scene)


@dataclass(frozen=True)
class ObjectStats:
    """Image-level statistics of shape classes over a set of (training) scenes."""
    frequency: dict[str, int]  # shape -> number of scenes containing it
    cooccurrence: dict[tuple[str, str], int]  # (a, b), a != b -> number of scenes containing both

    @classmethod
    def from_scenes(cls, scenes: list[Scene]) -> ObjectStats:
        frequency = Counter(s for scene in scenes for s in scene.shapes)
        cooc = Counter(pair for scene in scenes for pair in permutations(sorted(scene.shapes), 2))
        return cls({s: frequency[s] for s in SHAPES}, {(a, b): cooc[a, b] for a in SHAPES for b in SHAPES if a != b})

    def cooccurrence_score(self, shape: str, present: frozenset[str]) -> int:
        return sum(self.cooccurrence[p, shape] for p in present if p != shape)


def pope_negatives(scene: Scene, k: int, split: PopeSplit, stats: ObjectStats,
                   rng: np.random.Generator) -> list[str]:
    """k shape classes absent from the scene, chosen the way `split` says (ties: prior order)."""
    absent = [s for s in SHAPES if s not in scene.shapes]
    if split is PopeSplit.RANDOM:
        return [absent[i] for i in rng.choice(len(absent), size=k, replace=False)]
    if split is PopeSplit.POPULAR:
        return sorted(absent, key=lambda s: -stats.frequency[s])[:k]
    return sorted(absent, key=lambda s: (-stats.cooccurrence_score(s, scene.shapes), -stats.frequency[s]))[:k]


def pope_questions(scene: Scene, split: PopeSplit, stats: ObjectStats, rng: np.random.Generator,
                   max_positives: int = 3) -> list[QA]:
    """Balanced probes: up to `max_positives` present classes and as many absent ones, shuffled.

    The positives are drawn first, so an rng seeded alike for every split gives every split the
    same positives (as in POPE) and only the negatives differ.
    """
    present = sorted(scene.shapes, key=SHAPES.index)
    k = min(len(present), max_positives, len(SHAPES) - len(present))
    positives = [present[i] for i in sorted(rng.choice(len(present), size=k, replace=False))]
    shapes = positives + pope_negatives(scene, k, split, stats, rng)
    return [existence_question(shapes[i], scene) for i in rng.permutation(len(shapes))]


# Text-only instruction samples (no image): shape and colour facts a chat model would know.
SIDES = {"triangle": "3", "square": "4", "diamond": "4", "cross": "12", "star": "10"}
MIXES = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple"}


def text_only_qas() -> list[QA]:
    qs = [QA(f"How many sides does {article(s)} {s} have?", n, Kind.COUNT) for s, n in SIDES.items()]
    qs += [QA(f"What color do you get by mixing {a} and {b}?", c, Kind.COLOR) for (a, b), c in MIXES.items()]
    qs += [QA(f"What is the plural of {s}?", PLURALS[s], Kind.SHAPE) for s in SHAPES]
    qs += [QA("Name a shape with three sides.", "triangle", Kind.SHAPE),
           QA("Name a color of the rainbow that starts with the letter b.", "blue", Kind.COLOR),
           QA(f"Which of these is a color: {', '.join(SHAPES[:3])} or {list(COLORS)[0]}?", list(COLORS)[0], Kind.COLOR)]
    return qs
