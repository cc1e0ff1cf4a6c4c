import pytest
import torch

from moe_llava.train.upcycle import moe_config, upcycle
from tests.tiny import tiny_model

from .test_stages import _batch


@pytest.fixture(params=["stablelm", "phi"])
def pair(request):
    dense = tiny_model(request.param, moe=False, seed=1)
    return dense, upcycle(dense, moe_config(dense.config), seed=3)


def test_experts_are_exact_copies_of_the_ffn(pair):
    dense, moe = pair
    assert moe.config.moe.enable and moe.config.moe_layers == [0, 2]
    for idx in moe.config.moe_layers:
        prefix = f"language_model.model.layers.{idx}.mlp."
        ffn = dense.backbone.stack_ffn({k[len(prefix):]: v for k, v in dense.state_dict().items()
                                        if k.startswith(prefix)})
        layer = moe.layers[idx].mlp
        assert layer.num_experts == 4 and layer.top_k == 2 and layer.capacity_factor == 1.5
        for name, tensor in ffn.items():
            for e in range(4):
                assert torch.equal(getattr(layer, name)[e], tensor)
    dense_state = dense.state_dict()
    for name, tensor in moe.state_dict().items():  # everything else copied verbatim
        if ".mlp." not in name or not name.startswith(("language_model.model.layers.0.", "language_model.model.layers.2.")):
            assert torch.equal(tensor, dense_state[name]), name


def test_router_is_fresh():
    dense = tiny_model(moe=False)
    a, b = (upcycle(dense, moe_config(dense.config), seed=s) for s in (0, 1))
    ra, rb = a.layers[0].mlp.router.weight, b.layers[0].mlp.router.weight
    assert ra.shape == (4, 64) and ra.dtype == torch.float32 and not torch.equal(ra, rb)


def test_upcycled_model_computes_the_dense_function(pair):
    # sum_k w_k * Expert_k(x) = (sum_k w_k) * FFN(x) = FFN(x): the renormalised top-2 weights sum to 1.
    dense, moe = pair
    batch = _batch(dense)
    with torch.no_grad():
        want, got = dense.eval()(**batch), moe.eval()(**batch)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.lm_loss, want.lm_loss, atol=1e-6, rtol=1e-6)


def test_upcycling_options():
    dense = tiny_model(moe=False)
    cfg = moe_config(dense.config, num_experts=3, top_k=1, mode="first_half", capacity_factor=2.0, aux_loss_coef=0.1)
    moe = upcycle(dense, cfg)
    assert cfg.moe_layers == [0, 1] and cfg.moe.num_experts == [3, 3] and cfg.moe.router_aux_loss_coef == 0.1
    assert moe.layers[1].mlp.num_experts == 3 and moe.layers[1].mlp.capacity_factor == 2.0
    assert not dense.config.moe.enable  # the dense config is not modified


def test_aux_loss_alone_reaches_the_routers():
    dense = tiny_model(moe=False)
    moe = upcycle(dense, moe_config(dense.config)).train()
    out = moe(**_batch(moe))
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 0.01 * out.aux_loss)
    out.aux_loss.backward()  # the aux loss only: no LM gradient involved
    for layer in moe.moe_layers():
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    # The last MoE layer's aux loss depends on its router only (earlier experts feed later routers).
    assert moe.moe_layers()[-1].fc1_weight.grad is None
    # ... and the optimiser moves the router with it
    router = moe.layers[0].mlp.router.weight
    before = router.detach().clone()
    torch.optim.SGD([router], lr=1.0).step()
    assert not torch.equal(before, router)
