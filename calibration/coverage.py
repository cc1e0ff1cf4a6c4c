"""Expert coverage: how many calibration tokens each expert of each MoE layer was routed (top-k).

An expert that sees no calibration token gets no activation range: static Q/DQ of its MatMuls (portable
lowering) would have nothing to calibrate on, and its quantisation error would go unmeasured. Coverage is
counted from the PyTorch model's own routing, by forward hooks on every MoE layer's router Linear.

Shapes: T tokens, E experts, K active experts per token, L MoE layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moe_llava.moe import route


@dataclass
class ExpertCoverage:
    layers: list[int]                 # decoder layer index of each MoE layer
    num_experts: int
    top_k: int
    counts: np.ndarray = field(default=None)  # [L,E] tokens routed to each expert (top-k assignments)
    tokens: int = 0                   # tokens seen (per layer)
    samples: int = 0

    def __post_init__(self):
        if self.counts is None:
            self.counts = np.zeros((len(self.layers), self.num_experts), dtype=np.int64)

    def add(self, position: int, experts: np.ndarray) -> None:
        """experts [T,K]: the expert ids chosen for T tokens in MoE layer number `position`."""
        self.counts[position] += np.bincount(experts.reshape(-1), minlength=self.num_experts)

    @property
    def min_tokens(self) -> int:
        return int(self.counts.min()) if self.counts.size else 0

    def satisfied(self, min_tokens: int) -> bool:
        return self.min_tokens >= min_tokens

    def below(self, min_tokens: int) -> list[tuple[int, int, int]]:
        """(decoder layer, expert, tokens) of every expert under `min_tokens`."""
        return [(self.layers[i], e, int(c)) for i, row in enumerate(self.counts) for e, c in enumerate(row)
                if c < min_tokens]

    def never_fired(self) -> list[tuple[int, int]]:
        return [(layer, e) for layer, e, _ in self.below(1)]

    def to_dict(self, min_tokens: int | None = None) -> dict:
        d = {"moe_layers": self.layers, "num_experts": self.num_experts, "top_k": self.top_k,
             "samples": self.samples, "tokens": self.tokens, "min_tokens_per_expert": self.min_tokens,
             "tokens_per_expert": {str(layer): row.tolist() for layer, row in zip(self.layers, self.counts)},
             "never_fired": [list(x) for x in self.never_fired()]}
        if min_tokens is not None:
            d["required_min_tokens"] = min_tokens
            d["satisfied"] = self.satisfied(min_tokens)
        return d

    def format(self) -> str:
        head = "layer  " + "  ".join(f"e{e:<6}" for e in range(self.num_experts))
        rows = [f"{layer:>5}  " + "  ".join(f"{c:<7}" for c in row) for layer, row in zip(self.layers, self.counts)]
        return "\n".join([f"expert coverage: {self.samples} samples, {self.tokens} tokens, top-{self.top_k}, "
                          f"minimum {self.min_tokens} tokens per expert", head, *rows])


class RouterRecorder:
    """Context manager: hooks every MoE layer's router Linear and adds its top-k choices to `coverage`."""

    def __init__(self, model):
        moes = [(i, layer.mlp) for i, layer in enumerate(model.layers) if layer.mlp in model.moe_layers()]
        first = moes[0][1] if moes else None
        self.coverage = ExpertCoverage([i for i, _ in moes], first.num_experts if first else 0,
                                       first.top_k if first else 0)
        self._moes = [m for _, m in moes]
        self._hooks = []

    def _hook(self, position: int, k: int):
        def hook(_module, _inputs, logits):
            _, experts = route(logits.reshape(-1, logits.shape[-1]), k)           # [T,K]
            self.coverage.add(position, experts.numpy())
        return hook

    def __enter__(self) -> "RouterRecorder":
        self._hooks = [m.router.register_forward_hook(self._hook(p, m.top_k)) for p, m in enumerate(self._moes)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
