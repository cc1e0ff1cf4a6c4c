"""Next-token selection: greedy (temperature 0), temperature sampling, nucleus (top-p) filtering."""
from __future__ import annotations

import numpy as np

from runtime.errors import UserError


def check_sampling_args(temperature: float, top_p: float) -> None:
    if not temperature >= 0.0:
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """float64 probabilities of logits / temperature (max subtracted first, so -inf logits give 0)."""
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    return p / p.sum()


def top_p_filter(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Zero all but the smallest set of most probable tokens whose cumulative prob reaches top_p; renormalised.

    Ties in probability keep the lower token id first (stable sort), so the kept set is deterministic.
    """
    if top_p >= 1.0:
        return probs
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = min(int(np.searchsorted(cumulative, top_p, side="left")) + 1, probs.size)  # at least one
    filtered = np.zeros_like(probs)
    filtered[order[:keep]] = probs[order[:keep]]
    return filtered / filtered.sum()


def sample_next(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """logits [V] -> next token id. temperature 0 is argmax (first max on ties); rng is untouched then."""
    check_sampling_args(temperature, top_p)
    if logits.ndim != 1:
        raise ValueError(f"sample_next expects logits [V], got shape {logits.shape}")
    if np.isnan(logits).any():
        raise ValueError("logits contain NaN")
    if temperature == 0.0:
        return int(np.argmax(logits))
    probs = top_p_filter(softmax(logits, temperature), top_p)
    # Inverse-CDF draw: one uniform per token, so a seed fixes the whole sequence.
    index = int(np.searchsorted(np.cumsum(probs), rng.random(), side="right"))
    return min(index, int(np.flatnonzero(probs)[-1]))  # guard against cumsum ending just below 1.0
