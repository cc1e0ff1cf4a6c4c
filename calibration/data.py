"""Calibration samples: images + prompts, from the synthetic demo set, a LLaVA-JSON file or an image folder.

A sample is one conversation (the human turns, and the answers where the source has them) about at most
one image. Calibration runs the whole conversation through the model as one prefill, so the answer tokens
(what the model produces at decode time) are calibrated as well as the prompt and the visual tokens.

  default          the synthetic demo set's training instructions (the held-out scenes are kept for the
                   POPE check), generated once into a cache directory with `generate_dataset`
  --calib-data F   a LLaVA-JSON file; image paths are relative to F's folder
  --calib-data D   an image folder; every image is paired with one of DEFAULT_PROMPTS (round robin)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import UserError
from runtime.prompt import IMAGE_PLACEHOLDER, Template, Turn

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_PROMPTS = ("What is in the image?", "Describe the image briefly.", "What colors do you see?",
                   "How many objects are there?", "Where is the largest object?", "Is there a circle in the image?")
CACHE_ENV = "MOE_LLAVA_CACHE"


@dataclass(frozen=True)
class CalibSample:
    sample_id: str
    image: Path | None
    turns: tuple[Turn, ...]   # the first question carries the <image> placeholder when there is an image


@dataclass(frozen=True)
class SyntheticSpec:
    """Which synthetic set: the demo recipe's seed and held-out size, so POPE runs on the demo's held-out set."""
    seed: int = 0
    n_train: int = 3000
    n_heldout: int = 150

    @classmethod
    def demo(cls) -> "SyntheticSpec":
        try:
            from moe_llava.train.recipes import DEMO
        except ImportError:  # the training package is optional here; keep its documented defaults
            return cls()
        return cls(DEMO.seed, DEMO.n_train, DEMO.n_heldout)

    @property
    def key(self) -> str:
        return f"synthetic-seed{self.seed}-train{self.n_train}-heldout{self.n_heldout}"


def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                     "moe-llava-edge")
    return Path(base)


def synthetic_dataset(spec: SyntheticSpec = SyntheticSpec(), root: Path | None = None):
    """The synthetic set under `root` (default: the cache), generated once; written atomically."""
    from moe_llava.data import SyntheticDataset, generate_dataset
    target = Path(root) if root is not None else cache_root() / spec.key
    ds = SyntheticDataset.at(target)
    if ds.manifest_json.is_file():
        return ds
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        generate_dataset(staging, spec.n_train, spec.n_heldout, spec.seed)
        staging.rename(target)
    except OSError:
        if not ds.manifest_json.is_file():  # lost a race with another process: theirs is as good
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return SyntheticDataset.at(target)


def load_samples(calib_data: str | Path | None, template: Template,
                 synthetic: SyntheticSpec | None = None) -> list[CalibSample]:
    """Calibration candidates in a fixed order (coverage-driven selection takes a prefix of them)."""
    if calib_data is None:
        ds = synthetic_dataset(synthetic or SyntheticSpec.demo())
        return samples_from_llava_json(ds.instruct_json, template)
    path = Path(calib_data).expanduser()
    if path.is_dir():
        return samples_from_folder(path)
    if path.is_file():
        return samples_from_llava_json(path, template)
    raise UserError(f"--calib-data {path} does not exist; pass a LLaVA-JSON file or an image folder")


def samples_from_llava_json(path: Path, template: Template) -> list[CalibSample]:
    from moe_llava.train.dataset import read_records, record_turns
    records = read_records(path)
    samples = []
    for i, record in enumerate(records):
        if "image" in record:
            image = path.parent / record["image"]
            if not image.is_file():
                raise UserError(f"{path}: record {record.get('id', i)}: image {image} does not exist "
                                "(images are looked up relative to the JSON file's folder)")
        else:
            image = None
        turns = record_turns(record, template)
        samples.append(CalibSample(str(record.get("id", i)), image, tuple(turns)))
    return samples


def samples_from_folder(folder: Path) -> list[CalibSample]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"--calib-data {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [CalibSample(p.name, p, (Turn(f"{IMAGE_PLACEHOLDER}\n{DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)]}"),))
            for i, p in enumerate(images)]


def pope_records(ds, per_split: int | None) -> list[dict]:
    """The first `per_split` held-out POPE probes of each split (random, popular, adversarial)."""
    records = []
    for path in ds.pope_json.values():
        rows = json.loads(Path(path).read_text())
        records += rows[:per_split] if per_split is not None else rows
    return records
