from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import UserError
from runtime.sampling import sample_next, softmax, top_p_filter

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS).astype(np.float32)


def draw(logits, n, temperature=1.0, top_p=1.0, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([sample_next(logits, temperature, top_p, rng) for _ in range(n)])


def test_greedy_takes_the_first_maximum_and_leaves_rng_alone():
    logits = np.array([0.0, 3.0, -1.0, 3.0, 3.0], np.float32)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert sample_next(logits, 0.0, 1.0, rng) == 1
    assert sample_next(logits, 0.0, 0.1, rng) == 1  # top_p does not change greedy
    assert rng.bit_generator.state == state


def test_temperature_sampling_frequencies():
    n = 8_000
    for temperature in (1.0, 0.5, 2.0):
        expected = PROBS ** (1 / temperature) / (PROBS ** (1 / temperature)).sum()
        freq = np.bincount(draw(LOGITS, n, temperature), minlength=4) / n
        sigma = np.sqrt(expected * (1 - expected) / n)
        assert np.all(np.abs(freq - expected) < 4 * sigma), (temperature, freq, expected)


def test_same_seed_same_tokens():
    assert np.array_equal(draw(LOGITS, 50, seed=7), draw(LOGITS, 50, seed=7))
    assert not np.array_equal(draw(LOGITS, 50, seed=7), draw(LOGITS, 50, seed=8))


@pytest.mark.parametrize("top_p, kept", [(0.45, [0]), (0.7, [0, 1]), (0.85, [0, 1, 2]), (0.99, [0, 1, 2, 3]),
                                         (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    filtered = top_p_filter(softmax(LOGITS), top_p)
    assert list(np.flatnonzero(filtered)) == kept
    assert np.isclose(filtered.sum(), 1.0)
    np.testing.assert_allclose(filtered[kept], PROBS[kept] / PROBS[kept].sum(), rtol=1e-6)
    tokens = draw(LOGITS, 3000, top_p=top_p, seed=1)
    assert set(tokens.tolist()) == set(kept)  # tail tokens never drawn, every kept token drawn


def test_top_p_is_applied_after_temperature():
    # At T=0.25 probs become ~[0.87, 0.11, 0.007, 0.00001]: top_p 0.9 keeps two tokens, not three.
    assert set(draw(LOGITS, 2000, temperature=0.25, top_p=0.9).tolist()) == {0, 1}


def test_top_p_ties_keep_lower_ids_first():
    logits = np.zeros(4, np.float32)
    assert list(np.flatnonzero(top_p_filter(softmax(logits), 0.5))) == [0, 1]


def test_minus_inf_logits_are_never_drawn():
    logits = np.array([-np.inf, 0.0, -np.inf, 0.0], np.float32)
    assert set(draw(logits, 500).tolist()) == {1, 3}


@pytest.mark.parametrize("temperature, top_p", [(-0.1, 1.0), (1.0, 0.0), (1.0, 1.5), (float("nan"), 1.0)])
def test_bad_arguments(temperature, top_p):
    with pytest.raises(UserError):
        sample_next(LOGITS, temperature, top_p, np.random.default_rng(0))
