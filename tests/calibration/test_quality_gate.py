"""The quality gate judges the plain greedy agreement: near-ties are reported, never folded in."""
from calibration.validation import QUALITY, quality_failures
from export.compare import first_divergence


def _report(greedy: float, beyond_ties: float = 1.0, cosine: float = 0.99999, drop: float = 0.5,
            divergences=()) -> dict:
    return {"precision": "int8", "greedy_agreement": greedy, "greedy_agreement_beyond_ties": beyond_ties,
            "logit_cosine": {"mean": cosine}, "pope": {"gated": True, "f1_drop_points": drop},
            "divergences": list(divergences)}


def _divergence(sample: int, margin: float) -> dict:
    return {"sample": sample, "step": 2, "reference_token": 10 + sample, "runtime_token": 20 + sample,
            "reference_margin": margin}


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 7]) is None  # a longer answer with the same prefix


def test_plain_agreement_is_gated_even_when_every_flip_is_a_near_tie():
    gate = QUALITY["int8"].min_greedy_agreement
    flips = [_divergence(0, 0.01), _divergence(3, 0.7), _divergence(5, 0.02)]
    failures = quality_failures(_report(gate - 0.05, beyond_ties=1.0, divergences=flips))
    assert len(failures) == 1 and f"greedy agreement {gate - 0.05:.3f} < {gate}" in failures[0]
    # the failure names the most confident divergence, its tokens and margin
    assert "sample 3 step 2, PyTorch token 13 vs 23 by a logit margin of 0.700" in failures[0]
    assert quality_failures(_report(gate, divergences=flips)) == []


def test_other_gates():
    assert any("POPE" in f for f in quality_failures(_report(1.0, drop=3.0)))
    assert any("cosine" in f for f in quality_failures(_report(1.0, cosine=0.9)))
    ungated = _report(0.1)
    ungated["pope"]["gated"] = False   # a model that cannot answer: agreement reported, not judged
    assert quality_failures(ungated) == []
