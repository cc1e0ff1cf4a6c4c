"""The MoE module against an independent numpy implementation of the routing math."""
import math

import numpy as np
import pytest
import torch

from moe_llava.moe import Activation, MoELayer, apply_capacity, capacity, load_balancing_loss, route


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def np_moe(x, router_w, fc1, fc2, b1, b2, k, activation):
    """Token by token: softmax, top-k, renormalise, weighted sum of expert FFNs (float64)."""
    probs = np_softmax(x @ router_w.T)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-probs[t], kind="stable")[:k]
        w = probs[t, top] / probs[t, top].sum() if k > 1 else probs[t, top]
        for weight, e in zip(w, top):
            h = fc1[e] @ x[t] + (b1[e] if b1 is not None else 0)
            if activation == "swiglu":
                gate, up = np.split(h, 2)
                h = gate / (1 + np.exp(-gate)) * up
            else:
                h = np_gelu_tanh(h)
            out[t] += weight * (fc2[e] @ h + (b2[e] if b2 is not None else 0))
    return out


@pytest.mark.parametrize("activation,bias", [(Activation.SWIGLU, False), (Activation.GELU_TANH, True)])
@pytest.mark.parametrize("num_experts,k", [(4, 2), (8, 2), (4, 1), (16, 3)])
def test_moe_layer_equals_numpy(activation, bias, num_experts, k):
    torch.manual_seed(num_experts * 10 + k)
    layer = MoELayer(32, 48, num_experts, k, activation, bias).eval()
    with torch.no_grad():
        layer.router.weight.normal_(std=0.5)
        for p in (layer.fc1_bias, layer.fc2_bias):
            if p is not None:
                p.normal_(std=0.1)
    x = torch.randn(2, 9, 32)
    got = layer(x).reshape(-1, 32).detach().numpy()
    f64 = lambda p: None if p is None else p.detach().double().numpy()  # noqa: E731
    want = np_moe(x.reshape(-1, 32).double().numpy(), f64(layer.router.weight), f64(layer.fc1_weight),
                  f64(layer.fc2_weight), f64(layer.fc1_bias), f64(layer.fc2_bias), k, activation.value)
    # fp32 matmuls of width <= 96 against float64: errors ~1e-6 relative
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_route_renormalises_and_orders():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 3.0, 0.0, 0.0]])
    weights, experts = route(logits, 2)
    p = np_softmax(logits.numpy().astype(np.float64))
    assert experts[0].tolist() == [1, 2]
    np.testing.assert_allclose(weights[0].numpy(), p[0, [1, 2]] / p[0, [1, 2]].sum(), rtol=1e-6)
    np.testing.assert_allclose(weights.sum(-1).numpy(), 1.0, rtol=1e-6)
    assert route(logits.half(), 2)[0].dtype == torch.float32  # router math always in fp32


def test_aux_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.5, 0.2, 0.2, 0.1], [0.2, 0.2, 0.5, 0.1]])
    top1 = probs.argmax(-1)                       # experts 0, 1, 0, 2
    mean_probs = [0.375, 0.275, 0.25, 0.1]        # column means
    fraction = [0.5, 0.25, 0.25, 0.0]
    want = 4 * sum(m * f for m, f in zip(mean_probs, fraction))  # 4*(0.1875+0.06875+0.0625)
    assert load_balancing_loss(probs, top1).item() == pytest.approx(want, rel=1e-6)
    assert want == pytest.approx(1.275)


def test_capacity_drops_worked_example():
    # 4 tokens, 2 experts, k=2, capacity 3: top-1 choices fill first (tokens 0,1,2 -> expert 0;
    # token 3 -> expert 1), then top-2 choices in token order: tokens 0,1,2 -> expert 1 take slots 2,3,4
    # of expert 1 (slot 1 is token 3's), so token 2's second choice (slot 4 > 3) is dropped; token 3's
    # second choice (expert 0, slot 4) is dropped too.
    probs = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.1, 0.9]])
    experts = probs.topk(2, dim=-1).indices
    assert capacity(4, 2, 2, 0.75, 0) == 3
    weights, keep = apply_capacity(probs, experts, cap=3)
    assert keep.tolist() == [[True, True], [True, True], [True, False], [True, False]]
    # survivors are renormalised: a token left with one expert puts weight 1 on it
    np.testing.assert_allclose(weights.numpy(), [[0.6, 0.4], [0.7, 0.3], [1.0, 0.0], [1.0, 0.0]], rtol=1e-6)


def test_token_with_all_slots_dropped_gets_zero_output():
    layer = MoELayer(8, 16, 2, 2, Activation.SWIGLU, False, capacity_factor=0.25, min_capacity=1).train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0              # every token prefers expert 0, then expert 1
    x = torch.zeros(3, 8)
    x[:, 0] = 1.0
    x[:, 1:] = torch.randn(3, 7)
    out = layer(x)                                    # capacity max(ceil(3/2*0.25*2), 1) = 1 per expert
    # token 0 takes expert 0's only slot (top-1 round) and expert 1's only slot (top-2 round);
    # tokens 1 and 2 lose both choices -> MoE output 0, only the residual passes
    assert torch.count_nonzero(out[0]) > 0
    assert torch.count_nonzero(out[1:]) == 0
    assert layer.aux_loss is not None


def test_eval_is_dropless_and_training_records_aux():
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, 2, Activation.SWIGLU, False, capacity_factor=0.1)
    x = torch.randn(64, 16)
    dense = np_moe(x.double().numpy(), layer.router.weight.detach().double().numpy(),
                   layer.fc1_weight.detach().double().numpy(), layer.fc2_weight.detach().double().numpy(),
                   None, None, 2, "swiglu")
    np.testing.assert_allclose(layer.eval()(x).detach().numpy(), dense, rtol=1e-4, atol=1e-6)
    layer.train()(x)
    assert layer.aux_loss.item() > 0


def test_upcycled_experts_reproduce_the_dense_ffn():
    torch.manual_seed(1)
    ffn = {"fc1_weight": torch.randn(64, 16), "fc2_weight": torch.randn(16, 32)}
    layer = MoELayer.from_ffn(ffn, num_experts=4, top_k=2, activation=Activation.SWIGLU).eval()
    x = torch.randn(10, 16)
    gate, up = (x @ ffn["fc1_weight"].T).chunk(2, -1)
    dense = (torch.nn.functional.silu(gate) * up) @ ffn["fc2_weight"].T
    # weights sum to 1 up to an ulp; two fp32 products summed -> ~1e-5 relative
    torch.testing.assert_close(layer(x), dense, rtol=1e-4, atol=1e-4)
