"""The int8 quality gate: greedy divergences at near-tied logits do not fail an export; confident ones do."""
from calibration.validation import NEAR_TIE_LOGITS, quality_failures
from export.compare import first_divergence


def _report(greedy: float, beyond_ties: float, cosine: float = 0.99999, drop: float = 0.5) -> dict:
    return {"precision": "int8", "greedy_agreement": greedy, "greedy_agreement_beyond_ties": beyond_ties,
            "logit_cosine": {"mean": cosine}, "pope": {"gated": True, "f1_drop_points": drop}}


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 7]) is None  # a longer answer with the same prefix


def test_near_ties_pass_confident_flips_fail():
    assert NEAR_TIE_LOGITS < 1.0
    assert quality_failures(_report(0.75, 1.0)) == []                  # all flips at near-ties
    failures = quality_failures(_report(0.75, 0.5))                     # half the answers flipped confidently
    assert len(failures) == 1 and "greedy agreement 0.750" in failures[0]
    assert quality_failures(_report(0.97, 0.5)) == []                   # plain agreement above the gate
    assert any("POPE" in f for f in quality_failures(_report(1.0, 1.0, drop=3.0)))
    assert any("cosine" in f for f in quality_failures(_report(1.0, 1.0, cosine=0.9)))
