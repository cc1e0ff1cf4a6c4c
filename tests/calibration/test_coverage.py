"""Expert coverage: the hooked-router count equals a hand count; selection stops exactly when covered."""
import numpy as np
import torch

from calibration.calibset import CalibConfig, encode, select_by_coverage
from calibration.coverage import RouterRecorder
from calibration.data import samples_from_llava_json
from moe_llava.moe import route


def test_coverage_equals_a_hand_count(tiny_loaded):
    model = tiny_loaded.model
    moes = model.moe_layers()
    seen = []  # the hidden states each MoE layer received, for the hand count
    pre = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
           for m in moes]
    embeds = torch.randn(1, 37, model.config.hidden_size)
    try:
        with RouterRecorder(model) as recorder, torch.inference_mode():
            model.decode_embeds(embeds)
    finally:
        for h in pre:
            h.remove()
    assert len(seen) == len(moes) >= 1
    for position, (moe, x) in enumerate(zip(moes, seen)):
        with torch.inference_mode():
            _, experts = route(moe.router_logits(x), moe.top_k)                      # [T,K]
        hand = np.zeros(moe.num_experts, dtype=np.int64)
        for token in experts.tolist():
            for e in token:
                hand[e] += 1
        np.testing.assert_array_equal(recorder.coverage.counts[position], hand)
        assert hand.sum() == 37 * moe.top_k
    assert recorder.coverage.layers == [i for i, layer in enumerate(model.layers) if layer.mlp in moes]


def test_selection_stops_once_every_expert_has_n_tokens(tiny_loaded, small_set):
    samples = samples_from_llava_json(small_set.instruct_json, tiny_loaded.template)
    config = CalibConfig(min_tokens=20, min_samples=1, max_samples=len(samples))
    result = select_by_coverage(tiny_loaded, samples, config, progress=False)
    assert result.reached and result.coverage.min_tokens >= 20
    # minimal prefix: without the last kept sample some expert is still under 20 tokens
    with RouterRecorder(tiny_loaded.model) as recorder:
        for sample in samples[: len(result.samples) - 1]:
            encode(tiny_loaded, sample)
    assert not recorder.coverage.satisfied(20)
    assert result.summary()["satisfied"] and result.summary()["min_tokens_per_expert"] == result.coverage.min_tokens


def test_selection_reports_experts_that_never_fire(tiny_loaded, small_set):
    samples = samples_from_llava_json(small_set.instruct_json, tiny_loaded.template)
    moe = tiny_loaded.model.moe_layers()[0]

    def silence_expert_3(_module, _inputs, logits):
        logits = logits.clone()
        logits[:, 3] = -1e4
        return logits
    hook = moe.router.register_forward_hook(silence_expert_3)  # registered first: the recorder sees its output
    try:
        result = select_by_coverage(tiny_loaded, samples, CalibConfig(8, 1, 5), progress=False)
    finally:
        hook.remove()
    assert not result.reached and len(result.samples) == 5
    layer = result.coverage.layers[0]
    assert (layer, 3) in result.coverage.never_fired()
    assert result.coverage.min_tokens == 0 and (layer, 3, 0) in result.coverage.below(8)
    assert result.summary()["never_fired"][0] == [layer, 3]
