import hashlib
import json
import re
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moe_llava.data import (COLORS, GROUPS, POSITIONS, SHAPES, Kind, ObjectStats, PopeSplit, Scene, SceneObject,
                            caption, draw_scene, generate_dataset, load_scenes, questions, sample_scene)
from moe_llava.data.scene import MAX_ASPECT, MAX_SIDE, MIN_SIDE, PLURALS

from .conftest import N_HELDOUT, N_TRAIN


def _read(path: Path):
    return json.loads(path.read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stem(image: str) -> str:
    return Path(image).stem


# --- an answer oracle written independently of moe_llava.data.questions ------------------------------

def _at(scene: Scene, position: str) -> SceneObject:
    [obj] = [o for o in scene.objects if o.position == position]
    return obj


def _one(scene: Scene, **attrs) -> SceneObject:
    [obj] = [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]
    return obj


SINGULAR = {p: s for s, p in PLURALS.items()}
ORACLE = [
    (r"What color is the object (?:at|on|in) the (.+)\?", lambda s, m: _at(s, m[1]).color),
    (r"What color is the (\w+)\?", lambda s, m: _one(s, shape=m[1]).color),
    (r"What shape is (?:at|on|in) the (.+)\?", lambda s, m: _at(s, m[1]).shape),
    (r"What shape is the (\w+) object\?", lambda s, m: _one(s, color=m[1]).shape),
    (r"How many (?:objects are there|shapes are in the image)\?", lambda s, m: str(len(s.objects))),
    (r"How many (\w+) objects are there\?", lambda s, m: str(sum(o.color == m[1] for o in s.objects))),
    (r"How many (\w+) are there\?", lambda s, m: str(sum(o.shape == SINGULAR[m[1]] for o in s.objects))),
    (r"Where is the (\w+) (\w+)\?", lambda s, m: _one(s, color=m[1], shape=m[2]).position),
    (r"Is there an? (\w+) in the image\?", lambda s, m: "Yes" if m[1] in s.shapes else "No"),
]


def _oracle(scene: Scene, question: str, answer: str) -> str:
    question = question.removeprefix("<image>\n")
    for pattern, fn in ORACLE:
        if m := re.fullmatch(pattern, question):
            return fn(scene, m)
    # Description: every object named with its colour and where it is, nothing else.
    names = re.findall(r"(?:an?|An?) (\w+) (\w+) (?:at|on|in) the ([a-z ]+?)(?=,| and |\.$)", answer)
    assert len(names) == len(scene.objects), (question, answer)
    assert {(c, s, p) for c, s, p in names} == {(o.color, o.shape, o.position) for o in scene.objects}
    return answer


def test_caption_and_questions_on_a_known_scene():
    scene = Scene(90, 60, (220, 220, 220), (
        SceneObject("circle", "red", (1, 0), (15, 30), 16, COLORS["red"]),
        SceneObject("square", "orange", (0, 2), (75, 10), 16, COLORS["orange"]),
        SceneObject("circle", "blue", (2, 2), (75, 50), 16, COLORS["blue"])))
    scene = Scene(90, 60, scene.background, tuple(sorted(scene.objects, key=lambda o: o.cell)))
    assert caption(scene) == ("An orange square at the top right, a red circle on the left "
                              "and a blue circle at the bottom right.")
    qa = {q.question: q.answer for kind in Kind for q in questions(scene, kind)}
    assert qa["What color is the object on the left?"] == "red"
    assert qa["What color is the square?"] == "orange"
    assert "What color is the circle?" not in qa  # two circles: ambiguous, never asked
    assert qa["How many circles are there?"] == "2"
    assert qa["Where is the blue circle?"] == "bottom right"
    assert qa["Is there a star in the image?"] == "No" and qa["Is there a circle in the image?"] == "Yes"


def test_generation_is_byte_reproducible(tmp_path):
    a = generate_dataset(tmp_path / "a", 12, 6, seed=3)
    b = generate_dataset(tmp_path / "b", 12, 6, seed=3)
    assert _files(a.root) == _files(b.root)
    c = generate_dataset(tmp_path / "c", 12, 6, seed=4)
    assert _files(c.root)["images/train_000000.png"] != _files(a.root)["images/train_000000.png"]
    # Regenerating into an existing dataset replaces it (stale images from a bigger run go away).
    again = generate_dataset(tmp_path / "a", 5, 2, seed=3)
    assert len(list(again.images_dir.iterdir())) == 7


def test_heldout_scenes_do_not_depend_on_n_train(tmp_path):
    a = generate_dataset(tmp_path / "a", 4, 5)
    b = generate_dataset(tmp_path / "b", 9, 5)
    assert load_scenes(a, "heldout") == load_scenes(b, "heldout")
    assert _files(a.images_dir)["heldout_000004.png"] == _files(b.images_dir)["heldout_000004.png"]


def test_heldout_never_in_training_files(synthetic_ds):
    heldout = set(load_scenes(synthetic_ds, "heldout"))
    train = set(load_scenes(synthetic_ds, "train"))
    assert len(heldout) == N_HELDOUT and len(train) == N_TRAIN and not heldout & train
    for path in (synthetic_ds.captions_json, synthetic_ds.instruct_json):
        used = {_stem(r["image"]) for r in _read(path) if "image" in r}
        assert used and used <= train
    for path in [*synthetic_ds.pope_json.values(), synthetic_ds.open_questions_json]:
        assert {_stem(r["image"]) for r in _read(path)} == heldout
    train_hashes = {_sha(synthetic_ds.images_dir / f"{sid}.png") for sid in train}
    assert not train_hashes & {_sha(synthetic_ds.images_dir / f"{sid}.png") for sid in heldout}


def test_llava_json_format_and_images_exist(synthetic_ds):
    scenes = load_scenes(synthetic_ds)
    paths = [synthetic_ds.captions_json, synthetic_ds.instruct_json, synthetic_ds.open_questions_json,
             *synthetic_ds.pope_json.values()]
    for path in paths:
        records = _read(path)
        assert len({r["id"] for r in records}) == len(records), path
        for r in records:
            roles = [t["from"] for t in r["conversations"]]
            assert roles == ["human", "gpt"] * (len(roles) // 2) and roles
            text = "".join(t["value"] for t in r["conversations"])
            assert text.count("<image>") == ("image" in r)
            if "image" in r:
                assert r["conversations"][0]["value"].startswith("<image>")
                assert (synthetic_ds.root / r["image"]).is_file()
    for sid in ("train_000000", "heldout_000007"):
        with Image.open(synthetic_ds.images_dir / f"{sid}.png") as im:
            assert im.mode == "RGB" and im.size == (scenes[sid].width, scenes[sid].height)
    assert all(r["conversations"][0]["value"] == "<image>" for r in _read(synthetic_ds.captions_json))
    turns = Counter(len(r["conversations"]) // 2 for r in _read(synthetic_ds.instruct_json))
    assert turns[1] and turns[2] and turns[3]
    assert any("image" not in r for r in _read(synthetic_ds.instruct_json))
    manifest = _read(synthetic_ds.manifest_json)
    assert manifest["records"]["captions.json"] == N_TRAIN and manifest["shapes"] == list(SHAPES)


def test_every_answer_matches_the_scene(synthetic_ds):
    scenes = load_scenes(synthetic_ds)
    for path in [synthetic_ds.instruct_json, synthetic_ds.open_questions_json, *synthetic_ds.pope_json.values()]:
        for r in _read(path):
            if "image" not in r:
                continue
            conv = r["conversations"]
            for q, a in zip(conv[::2], conv[1::2]):
                assert a["value"] == _oracle(scenes[_stem(r["image"])], q["value"], a["value"]), (r["id"], q)
    for r in _read(synthetic_ds.captions_json):
        _oracle(scenes[r["id"]], "", r["conversations"][1]["value"])


def test_open_questions_cover_the_four_kinds(synthetic_ds):
    records = _read(synthetic_ds.open_questions_json)
    assert Counter(r["category"] for r in records) == {k: N_HELDOUT for k in ("color", "shape", "count", "position")}
    answers = {r["conversations"][1]["value"] for r in records}
    assert answers <= {*COLORS, *SHAPES, *POSITIONS.values(), "1", "2", "3", "4"}


@pytest.mark.parametrize("split", list(PopeSplit))
def test_pope_is_balanced_and_labels_are_right(synthetic_ds, split):
    scenes = load_scenes(synthetic_ds, "heldout")
    records = _read(synthetic_ds.pope_json[split])
    assert len(records) > 2 * N_HELDOUT
    assert Counter(r["label"] for r in records) == {"yes": len(records) // 2, "no": len(records) // 2}
    per_image = Counter((r["image"], r["label"]) for r in records)
    assert all(per_image[img, "yes"] == per_image[img, "no"] for img, _ in per_image)
    for r in records:
        assert r["split"] == split.value and r["conversations"][1]["value"] == r["label"].capitalize()
        assert (r["object"] in scenes[_stem(r["image"])].shapes) == (r["label"] == "yes")


def test_pope_splits_share_positives_and_differ_in_negatives_by_design(synthetic_ds):
    scenes = load_scenes(synthetic_ds)
    stats = ObjectStats.from_scenes([s for sid, s in scenes.items() if sid.startswith("train")])

    def probes(split, label):
        return [(r["image"], r["object"]) for r in _read(synthetic_ds.pope_json[split]) if r["label"] == label]

    yes = {s: sorted(probes(s, "yes")) for s in PopeSplit}
    assert yes[PopeSplit.RANDOM] == yes[PopeSplit.POPULAR] == yes[PopeSplit.ADVERSARIAL]
    neg = {s: probes(s, "no") for s in PopeSplit}
    cooc = {s: np.mean([stats.cooccurrence_score(o, scenes[_stem(i)].shapes) for i, o in neg[s]]) for s in neg}
    freq = {s: np.mean([stats.frequency[o] for _, o in neg[s]]) for s in neg}
    assert cooc[PopeSplit.ADVERSARIAL] > 1.3 * cooc[PopeSplit.RANDOM]
    assert freq[PopeSplit.POPULAR] > 1.1 * freq[PopeSplit.RANDOM]
    assert sorted(neg[PopeSplit.ADVERSARIAL]) != sorted(neg[PopeSplit.POPULAR])


def test_training_has_balanced_pope_style_probes(synthetic_ds):
    answers = [a["value"] for r in _read(synthetic_ds.instruct_json) for q, a in
               zip(r["conversations"][::2], r["conversations"][1::2]) if "Is there a" in q["value"]]
    assert len(answers) > N_TRAIN * 0.5
    assert 0.4 < answers.count("Yes") / len(answers) < 0.6


def test_shapes_cooccur_within_groups():
    scenes = [sample_scene(np.random.default_rng([9, i])) for i in range(600)]
    same = Counter()
    for scene in scenes:
        for a, b in combinations(sorted(scene.shapes), 2):
            same[any(a in g and b in g for g in GROUPS)] += 1
    # Uniform pairing would put ~1/4 of distinct-class pairs inside a group.
    assert same[True] > same[False]


def test_scene_geometry_is_legible_at_64px():
    for i in range(300):
        scene = sample_scene(np.random.default_rng([7, i]))
        w, h = scene.width, scene.height
        assert MIN_SIDE <= min(w, h) and max(w, h) <= MAX_SIDE and max(w, h) / min(w, h) <= MAX_ASPECT + 0.02
        assert 1 <= len(scene.objects) <= 4
        assert len({o.cell for o in scene.objects}) == len(scene.objects)
        assert len({(o.color, o.shape) for o in scene.objects}) == len(scene.objects)
        for o in scene.objects:
            col, row = o.center[0] * 3 // w, o.center[1] * 3 // h
            assert (row, col) == o.cell
            assert o.size / 2 <= o.center[0] <= w - o.size / 2 + 1 and o.size / 2 <= o.center[1] <= h - o.size / 2 + 1
            assert o.size * 64 / max(w, h) >= 9  # >= 9 px once padded to square and resized to 64
    aspects = [sample_scene(np.random.default_rng([8, i])) for i in range(100)]
    assert sum(s.width != s.height for s in aspects) > 50


def test_drawn_pixels_have_the_object_colour():
    inside = {"crescent": (-0.75, 0.0)}  # the centre of a crescent is background
    for i in range(40):
        scene = sample_scene(np.random.default_rng([5, i]))
        pixels = np.asarray(draw_scene(scene)).astype(int)
        assert (np.abs(pixels[0, 0] - scene.background) <= 1).all() or scene.objects[0].cell == (0, 0)
        for o in scene.objects:
            dx, dy = inside.get(o.shape, (0.0, 0.0))
            x, y = int(o.center[0] + dx * o.size / 2), int(o.center[1] + dy * o.size / 2)
            assert np.abs(pixels[y, x] - o.rgb).max() <= 40, (i, o)


def test_palette_is_distinct():
    rgb = {k: np.array(v) for k, v in COLORS.items()}
    assert min(np.linalg.norm(rgb[a] - rgb[b]) for a, b in combinations(rgb, 2)) > 75
    assert min(np.linalg.norm(v - g) for v in rgb.values() for g in range(195, 256)) > 80  # vs the grey backgrounds
