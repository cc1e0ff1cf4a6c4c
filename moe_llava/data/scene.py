"""Synthetic scenes: a few coloured shapes on a 3x3 grid, sampled from a seed and drawn with Pillow.

The object vocabulary is deliberately small and visually distinct at the ~64x64 px the demo vision
tower sees after pad-to-square + resize: canvases keep an aspect ratio <= MAX_ASPECT so a grid cell
is >= ~14 px there, and an object fills 70-95 % of its cell.

Co-occurrence structure (what makes POPE's adversarial split mean something): shapes belong to
GROUPS ("night sky", "card suits", "blocks"); after the first object, each further object comes from
the first object's group with probability GROUP_PROB, otherwise from the global popularity prior.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

# Popularity prior (sums to 1): the popular split of POPE picks from the head of this list.
SHAPE_PRIOR = {
    "circle": 0.20, "square": 0.17, "triangle": 0.14, "star": 0.12,
    "heart": 0.11, "diamond": 0.10, "cross": 0.08, "crescent": 0.08,
}
SHAPES = tuple(SHAPE_PRIOR)
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
GROUPS = (("star", "crescent", "circle"), ("heart", "diamond", "cross"), ("square", "triangle"))
GROUP_OF = {shape: group for group in GROUPS for shape in group}
GROUP_PROB = 0.75

# Saturated, well-separated hues; the background is a light grey, so no white/grey objects.
COLORS = {
    "red": (215, 35, 35), "orange": (245, 125, 20), "yellow": (235, 205, 25), "green": (40, 160, 55),
    "blue": (35, 75, 215), "purple": (135, 50, 180), "black": (25, 25, 25),
}
COLOR_JITTER = 12  # per channel, so "red" is a small cloud of reds, not one value

# (row, col) -> canonical position word; answers to "Where is ...?" are these strings.
POSITIONS = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
GRID = 3
COUNT_PROBS = (0.25, 0.30, 0.25, 0.20)  # P(1..4 objects)
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 48, 160, 1.5
SQUARE_PROB = 0.3  # the rest get an aspect ratio in (1, MAX_ASPECT], landscape or portrait
SIZE_RANGE = (0.70, 0.95)  # object bounding box / short side of its cell
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges, deterministic pixels


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    cell: tuple[int, int]  # (row, col) in the GRID x GRID layout
    center: tuple[int, int]  # px
    size: int  # px, side of the bounding box
    rgb: tuple[int, int, int]

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]  # reading order (row, then column)

    @property
    def shapes(self) -> frozenset[str]:
        return frozenset(o.shape for o in self.objects)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        objects = tuple(SceneObject(o["shape"], o["color"], tuple(o["cell"]), tuple(o["center"]),
                                    o["size"], tuple(o["rgb"])) for o in d["objects"])
        return cls(d["width"], d["height"], tuple(d["background"]), objects)


def _canvas_size(rng: np.random.Generator) -> tuple[int, int]:
    long_side = int(rng.integers(64, MAX_SIDE + 1))
    aspect = 1.0 if rng.random() < SQUARE_PROB else float(rng.uniform(1.1, MAX_ASPECT))
    short_side = max(MIN_SIDE, round(long_side / aspect))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _sample_shapes(rng: np.random.Generator, n: int) -> list[str]:
    prior = np.array(list(SHAPE_PRIOR.values()))
    shapes = [SHAPES[rng.choice(len(SHAPES), p=prior)]]
    for _ in range(n - 1):
        if rng.random() < GROUP_PROB:
            group = GROUP_OF[shapes[0]]
            p = np.array([SHAPE_PRIOR[s] for s in group])
            shapes.append(group[rng.choice(len(group), p=p / p.sum())])
        else:
            shapes.append(SHAPES[rng.choice(len(SHAPES), p=prior)])
    return shapes


def _sample_colors(rng: np.random.Generator, shapes: list[str]) -> list[str]:
    """Uniform colours, resampled so that every (colour, shape) pair in a scene is unique."""
    names = list(COLORS)
    colors: list[str] = []
    for shape in shapes:
        taken = {c for c, s in zip(colors, shapes) if s == shape}
        free = [c for c in names if c not in taken]
        colors.append(free[rng.integers(len(free))])
    return colors


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    noise = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(rgb) + noise, 0, 255))


def _place(rng: np.random.Generator, cell: tuple[int, int], width: int, height: int) -> tuple[tuple[int, int], int]:
    cw, ch = width / GRID, height / GRID
    size = int(min(cw, ch) * rng.uniform(*SIZE_RANGE))
    # Slack inside the cell moves the object around without leaving the cell.
    cx = cw * cell[1] + size / 2 + rng.uniform(0, cw - size)
    cy = ch * cell[0] + size / 2 + rng.uniform(0, ch - size)
    return (int(round(cx)), int(round(cy))), size


def sample_scene(rng: np.random.Generator) -> Scene:
    """One scene: 1-4 objects in distinct grid cells, canvas 48..160 px per side."""
    width, height = _canvas_size(rng)
    grey = int(rng.integers(205, 246))
    background = _jitter(rng, (grey, grey, grey), 10)
    n = int(rng.choice(len(COUNT_PROBS), p=COUNT_PROBS)) + 1
    shapes = _sample_shapes(rng, n)
    colors = _sample_colors(rng, shapes)
    cells = sorted(POSITIONS)
    cells = sorted(cells[i] for i in rng.choice(len(cells), size=n, replace=False))
    order = rng.permutation(n)  # shapes were sampled group-first; spread them over the cells
    objects = []
    for cell, k in zip(cells, order):
        center, size = _place(rng, cell, width, height)
        rgb = _jitter(rng, COLORS[colors[k]], COLOR_JITTER)
        objects.append(SceneObject(shapes[k], colors[k], cell, center, size, rgb))
    return Scene(width, height, background, tuple(objects))


# Outlines on the unit box [-1, 1]^2 (y down); drawn scaled by the object's half-size.
def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    angles = [math.pi * k / points - math.pi / 2 for k in range(2 * points)]
    return [((1 if k % 2 == 0 else inner) * math.cos(a), (1 if k % 2 == 0 else inner) * math.sin(a) + 0.08)
            for k, a in enumerate(angles)]


def _heart(n: int = 48) -> list[tuple[float, float]]:
    ts = [2 * math.pi * k / n for k in range(n)]
    return [(16 * math.sin(t) ** 3 / 17, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                            - math.cos(4 * t)) / 17 - 0.1) for t in ts]


def _crescent(d: float = 0.5, rho: float = 0.85, n: int = 32) -> list[tuple[float, float]]:
    """Unit disk minus a disk of radius rho centred at (d, 0): outer arc, then inner arc back."""
    x = (1 - rho ** 2 + d ** 2) / (2 * d)
    y = math.sqrt(1 - x ** 2)
    t0, p0 = math.atan2(y, x), math.atan2(y, x - d)
    outer = [t0 + (2 * math.pi - 2 * t0) * k / n for k in range(n + 1)]
    inner = [(2 * math.pi - p0) - (2 * math.pi - 2 * p0) * k / n for k in range(n + 1)]
    return ([(math.cos(t), math.sin(t)) for t in outer]
            + [(d + rho * math.cos(p), rho * math.sin(p)) for p in inner])


OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)],
    "triangle": [(0, -1), (1, 0.8), (-1, 0.8)],
    "diamond": [(0, -1), (0.72, 0), (0, 1), (-0.72, 0)],
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "star": _star(),
    "heart": _heart(),
    "crescent": _crescent(),
}


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, scale: int) -> None:
    cx, cy, r = obj.center[0] * scale, obj.center[1] * scale, obj.size * scale / 2
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=obj.rgb)
    else:
        draw.polygon([(cx + r * x, cy + r * y) for x, y in OUTLINES[obj.shape]], fill=obj.rgb)


def draw_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB image of scene.width x scene.height."""
    s = SUPERSAMPLE
    image = Image.new("RGB", (scene.width * s, scene.height * s), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, s)
    return image.reduce(s)  # s x s box average, ~2x faster than resize(BOX)
