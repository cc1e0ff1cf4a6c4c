"""The calibration set: samples run through the PyTorch model, kept until expert coverage is reached.

Each kept sample holds exactly what the exported parts consume, computed by the fp32 PyTorch model:
pixel_values (vision), image_features (projector), text ids (embed) and the spliced inputs_embeds of the
whole conversation (decoder prefill, visual tokens included). Readers for each quantiser are built from
these (calibration/readers.py).

Shapes: S positions after the splice, H hidden, P visual tokens, Dv vision width.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from moe_llava.loading import LoadedModel
from runtime.errors import UserError
from runtime.prompt import IMAGE_TOKEN_INDEX, tokenize_conversation

from .coverage import ExpertCoverage, RouterRecorder
from .data import CalibSample

MAX_POSITIONS = 512  # longest calibration prefill (longer conversations are cut)
SMALL_MODEL_PARAMS = 100_000_000


@contextlib.contextmanager
def torch_threads_for(model):
    """One intra-op thread for small models: their per-op work is too little to split, and OpenMP workers
    spinning against other processes on a 2-core machine made a tiny model's prefill 40x slower here."""
    small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class CalibConfig:
    min_tokens: int = 32      # every expert of every MoE layer must see this many tokens ...
    min_samples: int = 16     # ... and at least this many samples are kept (dense activation ranges)
    max_samples: int = 256    # give up adding samples here and report the uncovered experts


@dataclass
class EncodedSample:
    sample_id: str
    text_ids: np.ndarray             # [S_text] int64, the image slot removed
    inputs_embeds: np.ndarray        # [S,H] float32
    pixel_values: np.ndarray | None  # [3,h,w]
    image_features: np.ndarray | None  # [P,Dv] vision output (the projector's input)


@dataclass
class CalibrationSet:
    samples: list[EncodedSample]
    coverage: ExpertCoverage
    config: CalibConfig
    candidates: int                  # how many samples were available

    @property
    def reached(self) -> bool:
        return self.coverage.satisfied(self.config.min_tokens)

    def summary(self) -> dict:
        d = self.coverage.to_dict(self.config.min_tokens)
        d.update(candidates=self.candidates, min_samples=self.config.min_samples,
                 max_samples=self.config.max_samples)
        return d


@torch.inference_mode()
def encode(loaded: LoadedModel, sample: CalibSample, max_positions: int = MAX_POSITIONS) -> EncodedSample:
    """One sample through tower + projector + splice, then a decoder prefill (router hooks see it)."""
    from runtime.preprocess import load_image
    model = loaded.model
    ids, _ = tokenize_conversation(loaded.tokenizer, loaded.template, list(sample.turns), loaded.bos_token_id)
    pixels = features = embeds = None
    if IMAGE_TOKEN_INDEX in ids:
        if sample.image is None:
            raise UserError(f"calibration sample {sample.sample_id}: '<image>' in the prompt but no image")
        pixels = loaded.image_processor(load_image(sample.image))                      # [3,h,w]
        features = model.vision_tower(torch.from_numpy(pixels)[None])                   # [1,P,Dv]
        embeds = model.projector(features)                                              # [1,P,H]
    inputs_embeds, _, _ = model.splice(torch.tensor([ids]), embeds)                     # [1,S,H]
    inputs_embeds = inputs_embeds[:, :max_positions]
    model.decode_embeds(inputs_embeds)
    text = np.array([i for i in ids if i != IMAGE_TOKEN_INDEX], dtype=np.int64)
    return EncodedSample(sample.sample_id, text, inputs_embeds[0].float().numpy(), pixels,
                         None if features is None else features[0].float().numpy())


def select_by_coverage(loaded: LoadedModel, candidates: list[CalibSample], config: CalibConfig = CalibConfig(),
                       progress: bool = True) -> CalibrationSet:
    """Add candidates in order until every expert saw >= config.min_tokens tokens (and min_samples kept).

    Stops at config.max_samples or when the candidates run out; `CalibrationSet.reached` then says False and
    `coverage.below(...)` names the experts that stayed under the bar (never_fired: those with none).
    """
    if not candidates:
        raise UserError("no calibration samples")
    kept: list[EncodedSample] = []
    model = loaded.model.eval()
    with RouterRecorder(model) as recorder, torch_threads_for(model):
        bar = tqdm(total=min(config.max_samples, len(candidates)), desc="calibration", unit="sample",
                   disable=not progress, leave=False)
        for sample in candidates[: config.max_samples]:
            enc = encode(loaded, sample)
            kept.append(enc)
            recorder.coverage.samples += 1
            recorder.coverage.tokens += len(enc.inputs_embeds)
            bar.update()
            if len(kept) >= config.min_samples and recorder.coverage.satisfied(config.min_tokens):
                break
        bar.close()
    return CalibrationSet(kept, recorder.coverage, config, len(candidates))
