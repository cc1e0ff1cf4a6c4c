import pytest
import torch

from moe_llava.train.stages import STAGES, Group, Stage, apply_freezing, moe_parameter_names
from runtime.prompt import IGNORE_INDEX
from tests.tiny import tiny_model


def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 300, (2, 12), generator=g)
    ids[:, 2] = -200  # one image slot per sample
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    pixels = torch.randn(2, 3, 28, 28, generator=g)
    return dict(input_ids=ids, labels=labels, pixel_values=pixels, attention_mask=torch.ones_like(ids))


def _grads(model) -> set[str]:
    model.train()
    model(**_batch(model)).loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def _names(model, prefix):
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


@pytest.mark.parametrize("stage", [Stage.PRETRAIN, Stage.FINETUNE])
def test_dense_stages_train_only_their_groups(stage):
    model = tiny_model(moe=False)
    trainable = set(apply_freezing(model, STAGES[stage].groups))
    expected = _names(model, "projector.")
    if stage is Stage.FINETUNE:
        expected |= _names(model, "language_model.")
    assert trainable == expected
    grads = _grads(model)
    assert grads <= expected and _names(model, "projector.") <= grads
    assert not any(n.startswith("vision_tower.") for n in grads)
    if stage is Stage.FINETUNE:  # every LLM weight on the path gets a gradient
        assert "language_model.lm_head.weight" in grads and "language_model.model.layers.0.mlp.gate_proj.weight" in grads


def test_stage3_trains_only_moe_layers():
    model = tiny_model(moe=True)
    trainable = set(apply_freezing(model, STAGES[Stage.MOE].groups))
    moe = moe_parameter_names(model)
    assert trainable == moe and moe == {f"language_model.model.layers.{i}.mlp.{p}" for i in (0, 2)
                                        for p in ("router.weight", "fc1_weight", "fc2_weight")}
    grads = _grads(model)
    assert grads == moe  # routers included: the LM loss reaches them through the expert weights


def test_train_tower_option_unfreezes_the_tower():
    model = tiny_model(moe=False)
    trainable = set(apply_freezing(model, (Group.PROJECTOR, Group.VISION_TOWER)))
    assert _names(model, "vision_tower.") <= trainable


def test_reference_hyper_parameters():
    assert [STAGES[s].learning_rate for s in Stage] == [1e-3, 2e-5, 2e-5]
    assert STAGES[Stage.PRETRAIN].plain_template and not STAGES[Stage.FINETUNE].plain_template
    assert [STAGES[s].moe for s in Stage] == [False, False, True]
