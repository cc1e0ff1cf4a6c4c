"""The one MoE module: used by training, reference inference and (through its weights and `route`) export.

Shapes: T tokens, H hidden, E experts, K active experts per token, I expert FFN width,
F fc1 rows (2I for SwiGLU: gate rows then up rows; I for GELU).

Semantics (MoE-LLaVA on DeepSpeed's top-k gating, made deterministic):
  probs = softmax(router(x) in fp32); experts = top-k(probs); weights = renormalised top-k probs (k > 1);
  out = sum_k weights_k * FFN_{experts_k}(x).
Training applies DeepSpeed's capacity (top-1 assignments fill first, earlier tokens win, weights
renormalised over the surviving assignments) and records the load-balancing loss; eval is dropless.
"""
from __future__ import annotations

import math
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .upcast import stored


class Activation(str, Enum):
    SWIGLU = "swiglu"        # down(silu(gate x) * up x)        - StableLM, Qwen
    GELU_TANH = "gelu_tanh"  # fc2(gelu_new(fc1 x + b1)) + b2    - Phi-2
    GELU_ERF = "gelu_erf"


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T,E] router logits -> (weights [T,K] fp32, expert ids [T,K] int64), ordered by probability.

    With k == 1 the weight is the raw top-1 probability (as DeepSpeed's top-1 gate), otherwise the
    k probabilities renormalised to sum to 1 (its top-2 gate).
    """
    probs = logits.float().softmax(dim=-1)
    weights, experts = probs.topk(k, dim=-1)
    if k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def load_balancing_loss(probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """l_aux = E * sum_e mean_t(probs[t,e]) * fraction_t(top1(t) == e)   (probs [T,E], top1 [T])."""
    num_experts = probs.shape[-1]
    fraction = F.one_hot(top1, num_experts).float().mean(dim=0)  # [E]
    return num_experts * torch.sum(probs.mean(dim=0) * fraction)


def capacity(num_tokens: int, num_experts: int, k: int, factor: float, min_capacity: int) -> int:
    return max(math.ceil(num_tokens / num_experts * factor * k), min_capacity)


def apply_capacity(probs: torch.Tensor, experts: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop assignments beyond `cap` tokens per expert; returns (weights [T,K], keep [T,K] bool).

    Slots fill rank by rank (all top-1 choices, in token order, before any top-2 choice), as DeepSpeed
    does. Weights are the kept probabilities renormalised over what survived (k > 1); a token that
    lost every slot gets weight 0, i.e. only the residual passes.
    """
    num_experts = probs.shape[-1]
    taken = torch.zeros(num_experts, dtype=torch.long, device=probs.device)
    keep = []
    for rank in range(experts.shape[1]):
        onehot = F.one_hot(experts[:, rank], num_experts)           # [T,E]
        slot = (onehot.cumsum(dim=0) - 1 + taken) * onehot           # [T,E] position in expert queue
        keep.append(((slot < cap) & onehot.bool()).any(dim=-1))      # [T]
        taken = taken + onehot.sum(dim=0)
    keep = torch.stack(keep, dim=1)                                  # [T,K]
    picked = probs.gather(1, experts) * keep                         # [T,K]
    if experts.shape[1] > 1:
        picked = picked / picked.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(picked.dtype).eps)
    return picked, keep


class MoELayer(nn.Module):
    """Router + E stacked expert FFNs, a drop-in replacement for a decoder layer's MLP."""

    def __init__(self, hidden_size: int, ffn_size: int, num_experts: int, top_k: int,
                 activation: Activation, bias: bool, capacity_factor: float = 1.5,
                 eval_capacity_factor: float = 2.0, min_capacity: int = 0):
        super().__init__()
        self.num_experts, self.top_k, self.activation = num_experts, top_k, Activation(activation)
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity = min_capacity
        fc1_rows = 2 * ffn_size if self.activation is Activation.SWIGLU else ffn_size
        self.router = nn.Linear(hidden_size, num_experts, bias=False, dtype=torch.float32)
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, fc1_rows, hidden_size))   # [E,F,H]
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size))   # [E,H,I]
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, fc1_rows)) if bias else None  # [E,F]
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, hidden_size)) if bias else None  # [E,H]
        for w in (self.fc1_weight, self.fc2_weight):
            nn.init.normal_(w, std=0.02)
        self.aux_loss: torch.Tensor | None = None

    @property
    def ffn_size(self) -> int:
        return self.fc2_weight.shape[-1]

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[T,H] -> [T,E], always in fp32 (the router is kept in fp32, as in DeepSpeed)."""
        return self.router(x.float())

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """FFN of expert e on its tokens: [n,H] -> [n,H]."""
        h = x @ self._slice("fc1_weight", e, x).T                     # [n,F]
        if self.fc1_bias is not None:
            h = h + self._slice("fc1_bias", e, x)
        h = activate(h, self.activation)                              # [n,I]
        y = h @ self._slice("fc2_weight", e, x).T                     # [n,H]
        return y + self._slice("fc2_bias", e, x) if self.fc2_bias is not None else y

    def _slice(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's part of a stacked parameter in x's dtype. Stacks stored in 16 bits for fp32 compute
        (upcast.py) are sliced before the cast, so a token pays for its k experts, not all E."""
        return stored(self, name)[e].to(x.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])                      # [T,H]
        logits = self.router_logits(x)                                # [T,E]
        weights, experts = route(logits, self.top_k)                  # [T,K], [T,K]
        keep = None
        if self.training:
            probs = logits.softmax(dim=-1)
            self.aux_loss = load_balancing_loss(probs, experts[:, 0])
            cap = capacity(x.shape[0], self.num_experts, self.top_k, self.capacity_factor, self.min_capacity)
            weights, keep = apply_capacity(probs, experts, cap)
        return self.combine(x, weights, experts, keep).reshape(shape)

    def combine(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                keep: torch.Tensor | None) -> torch.Tensor:
        """sum_k weights[t,k] * expert_{experts[t,k]}(x[t]), computing each expert once on its tokens."""
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)  # [T*K]
        expert, weight = experts.reshape(-1), weights.reshape(-1)                          # [T*K]
        if keep is not None:
            kept = keep.reshape(-1)
            token, expert, weight = token[kept], expert[kept], weight[kept]
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        out = torch.zeros_like(x)
        for e, slots in enumerate(order.split(counts)):
            if slots.numel():  # unselected experts cost nothing: decode reads only k experts
                rows = token[slots]
                y = self.expert(x[rows], e) * weight[slots, None].to(x.dtype)
                out.index_add_(0, rows, y)
        return out

    @classmethod
    def from_ffn(cls, stacked_ffn: dict[str, torch.Tensor], num_experts: int, **kwargs) -> "MoELayer":
        """Stage III upcycling: every expert an exact copy of one dense FFN ({fc1_weight: [F,H], ...})."""
        fc1 = stacked_ffn["fc1_weight"]
        layer = cls(hidden_size=fc1.shape[1], ffn_size=stacked_ffn["fc2_weight"].shape[1],
                    num_experts=num_experts, bias="fc1_bias" in stacked_ffn, **kwargs)
        with torch.no_grad():
            for name, tensor in stacked_ffn.items():
                getattr(layer, name).copy_(tensor.unsqueeze(0).expand(num_experts, *tensor.shape))
        return layer


# The backbones' own activation modules, so experts match the dense FFN they were copied from bit for bit.
_GELU = {Activation.GELU_TANH: ACT2FN["gelu_new"], Activation.GELU_ERF: ACT2FN["gelu"]}


def activate(h: torch.Tensor, activation: Activation) -> torch.Tensor:
    """fc1 output [n,F] -> [n,I]."""
    if activation is Activation.SWIGLU:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _GELU[activation](h)
