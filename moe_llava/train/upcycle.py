"""Stage III initialisation ("sparse upcycling"): a dense stage-II model -> an MoE model.

Every expert of an MoE layer is an exact copy of that layer's stage-II FFN and the router is freshly
initialised. Until training moves the experts apart the MoE model computes exactly what the dense one
did (in eval, i.e. dropless): each token's output is sum_k w_k * FFN(x) = FFN(x), because the top-k
weights are renormalised to sum to 1, whatever the (random) router chose.
"""
from __future__ import annotations

import torch

from runtime.errors import UserError

from ..config import MoELlavaConfig
from ..model import MoELlavaForCausalLM
from ..moe import MoELayer


def moe_config(dense: MoELlavaConfig, num_experts: int | None = None, top_k: int | None = None,
               mode: str | None = None, layers_idx: list[int] | None = None,
               capacity_factor: float | None = None, aux_loss_coef: float | None = None) -> MoELlavaConfig:
    """The dense config with the `moe` dict switched on; unset arguments keep the dict's values."""
    config = dense.copy()
    moe = config.moe
    moe.enable = True
    moe.mode = mode or moe.mode
    moe.layers_idx = layers_idx if layers_idx is not None else (None if mode else moe.layers_idx)
    moe.num_experts = [num_experts] if num_experts else moe.num_experts[:1]
    moe.top_k = top_k or moe.top_k
    moe.capacity_factor = capacity_factor if capacity_factor is not None else moe.capacity_factor
    moe.router_aux_loss_coef = aux_loss_coef if aux_loss_coef is not None else moe.router_aux_loss_coef
    moe.train_modules = ["deepspeed_moe"]  # reference substring match: exactly the experts + routers
    moe.resolve_layers(config.num_layers)
    if moe.top_k > min(moe.num_experts):
        raise UserError(f"top_k {moe.top_k} exceeds the number of experts {min(moe.num_experts)}")
    return config


def upcycle(dense: MoELlavaForCausalLM, config: MoELlavaConfig, seed: int = 0) -> MoELlavaForCausalLM:
    """A new MoE model: non-MoE weights copied from `dense`, experts = copies of its FFNs, fresh routers."""
    if dense.config.moe.enable:
        raise UserError("upcycling needs a dense (moe_enable: false) stage-II model")
    torch.manual_seed(seed)  # the fresh routers
    model = MoELlavaForCausalLM(config, dense.vision_tower.spec)
    state = dense.state_dict()
    prefixes = [f"language_model.model.layers.{i}.mlp." for i in config.moe_layers]
    kept = {k: v for k, v in state.items() if not k.startswith(tuple(prefixes))}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    if unexpected or any(not k.startswith(tuple(prefixes)) for k in missing):
        raise UserError(f"upcycling: the dense model does not match the MoE config (unexpected {unexpected[:3]}, "
                        f"missing {[k for k in missing if not k.startswith(tuple(prefixes))][:3]})")
    for idx, prefix in zip(config.moe_layers, prefixes):
        ffn = dense.backbone.stack_ffn({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        model.layers[idx].mlp = upcycled_layer(ffn, model.layers[idx].mlp)
    return model.train(dense.training)


def upcycled_layer(ffn: dict[str, torch.Tensor], template: MoELayer) -> MoELayer:
    """An MoELayer shaped like `template` whose experts all equal `ffn` (stacked layout) and whose router is
    the template's freshly initialised one."""
    layer = MoELayer.from_ffn(ffn, template.num_experts, top_k=template.top_k, activation=template.activation,
                              capacity_factor=template.capacity_factor,
                              eval_capacity_factor=template.eval_capacity_factor,
                              min_capacity=template.min_capacity)
    layer.router.load_state_dict(template.router.state_dict())
    check_experts_equal(layer, ffn)
    return layer


def check_experts_equal(layer: MoELayer, ffn: dict[str, torch.Tensor]) -> None:
    for name, tensor in ffn.items():
        stacked = getattr(layer, name)  # [E, ...]
        if not all(torch.equal(stacked[e], tensor) for e in range(layer.num_experts)):
            raise AssertionError(f"upcycled {name} differs from the dense FFN")
