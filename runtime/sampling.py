"""Next-token selection: penalties, greedy (temperature 0), temperature sampling, top-k and nucleus (top-p)."""
from __future__ import annotations

import numpy as np

from runtime.settings import GenerationSettings, check_sampling_args


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


def top_k_filter(probs: np.ndarray, top_k: int) -> np.ndarray:
    """Zero all but the top_k most probable tokens (0 = off; ties keep the lower id); renormalised."""
    if top_k <= 0 or top_k >= probs.size:
        return probs
    keep = np.argsort(-probs, kind="stable")[:top_k]
    filtered = np.zeros_like(probs)
    filtered[keep] = probs[keep]
    return filtered / filtered.sum()


class TokenHistory:
    """Token counts for the penalties: `context` holds every token seen (prompt text + answer), `generated`
    the answer's tokens only. Counts are over the logits' vocabulary; ids outside it are ignored."""

    def __init__(self, vocab_size: int, prompt_ids: list[int]):
        self.context = np.zeros(vocab_size, np.int64)
        self.generated = np.zeros(vocab_size, np.int64)
        ids = np.asarray([i for i in prompt_ids if 0 <= i < vocab_size], np.int64)
        np.add.at(self.context, ids, 1)

    def add(self, token_id: int) -> None:
        if 0 <= token_id < self.context.size:
            self.context[token_id] += 1
            self.generated[token_id] += 1


def penalise(logits: np.ndarray, history: TokenHistory, settings: GenerationSettings) -> np.ndarray:
    """logits [V] -> a penalised float64 copy (see GenerationSettings for the definitions)."""
    out = logits.astype(np.float64)
    seen = history.context > 0
    if settings.repetition_penalty != 1.0:
        scaled = np.where(out > 0, out / settings.repetition_penalty, out * settings.repetition_penalty)
        out = np.where(seen, scaled, out)
    out -= settings.frequency_penalty * history.generated + settings.presence_penalty * (history.generated > 0)
    return out


def sample_next(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator | None,
                top_k: int = 0) -> int:
    """logits [V] -> next token id. temperature 0 is argmax (first max on ties); rng is untouched (may be None)
    then."""
    check_sampling_args(temperature, top_p)
    if logits.ndim != 1:
        raise ValueError(f"sample_next expects logits [V], got shape {logits.shape}")
    if np.isnan(logits).any():
        raise ValueError("logits contain NaN")
    if temperature == 0.0:
        return int(np.argmax(logits))
    probs = top_p_filter(top_k_filter(softmax(logits, temperature), top_k), top_p)
    # Inverse-CDF draw: one uniform per token, so a seed fixes the whole sequence.
    index = int(np.searchsorted(np.cumsum(probs), rng.random(), side="right"))
    return min(index, int(np.flatnonzero(probs)[-1]))  # guard against cumsum ending just below 1.0
