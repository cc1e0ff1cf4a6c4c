"""An independent Qwen-1 (MoE-LLaVA-Qwen) language model, written from the published facts, in float64.

It reads the OFFICIAL keys (transformer.h.{i}.attn.c_attn, mlp.w1/w2/c_proj, deepspeed_moe...) straight from
a checkpoint's tensors and shares no code with moe_llava (no transformers modules, no stacked experts):
  block: h = x + c_proj(attn(ln_1 x)); out = h + mlp(ln_2 h); RMSNorm(x) = x * rsqrt(mean(x^2) + eps) * w
  attn:  q|k|v = c_attn(x) (bias), heads of kv_channels, rotate-half rotary on the full head (in fp32/64),
         softmax(q k^T / sqrt(d)) v with a causal mask when there is no cache, c_proj without bias
  mlp:   c_proj(w1(x) * silu(w2(x))); MoE: softmax(wg x) -> top-2 renormalised -> sum w_k expert_k(x)
  long context (past seq_length): dynamic NTK (alpha fixed at prefill) and log-n query scaling.
Shapes: S new positions, T cached + new positions, N heads, D head dim, H hidden, E experts.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


class Qwen1Reference:
    def __init__(self, state: dict[str, torch.Tensor], fields: dict, moe_top_k: int = 2):
        self.w = {k: v.to(F64) for k, v in state.items() if not k.startswith(("transformer.image_tower",
                                                                             "transformer.mm_projector"))}
        self.layers = int(fields["num_hidden_layers"])
        self.heads, self.head_dim = int(fields["num_attention_heads"]), int(fields["kv_channels"])
        self.eps, self.base = float(fields["layer_norm_epsilon"]), float(fields["rotary_emb_base"])
        self.seq_length = int(fields["seq_length"])
        self.ntk, self.logn = fields.get("use_dynamic_ntk", True), fields.get("use_logn_attn", True)
        self.top_k = moe_top_k
        self.past: list[tuple[torch.Tensor, torch.Tensor]] | None = None   # per layer: keys, values [T,N,D]
        self.alpha = 1.0

    # ---- pieces ---------------------------------------------------------------------------------
    def linear(self, x, name, bias=False):
        y = x @ self.w[name + ".weight"].T
        return y + self.w[name + ".bias"] if bias else y

    def rms(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w[name + ".weight"]

    def ffn(self, x, prefix):
        return self.linear(self.linear(x, prefix + "w1") * torch.nn.functional.silu(self.linear(x, prefix + "w2")),
                           prefix + "c_proj")

    def mlp(self, x, layer):
        prefix = f"transformer.h.{layer}.mlp."
        if prefix + "deepspeed_moe.gate.wg.weight" not in self.w:
            return self.ffn(x, prefix)
        probs = torch.softmax(self.linear(x, prefix + "deepspeed_moe.gate.wg"), dim=-1)         # [S,E]
        out = torch.zeros_like(x)
        for s in range(x.shape[0]):
            top = torch.argsort(probs[s], descending=True)[: self.top_k].tolist()
            weights = probs[s, top] / probs[s, top].sum()
            for w, e in zip(weights, top):
                out[s] += w * self.ffn(x[s], f"{prefix}deepspeed_moe.experts.deepspeed_experts.{e}.")
        return out

    def rotary(self, t, positions):
        """t [S,N,D] at absolute positions [S]: t*cos + rotate_half(t)*sin, base scaled by the NTK alpha."""
        d = self.head_dim
        base = self.base * self.alpha ** (d / (d - 2))
        inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=F64) / d)
        freqs = torch.outer(positions.to(F64), inv_freq)                                        # [S,D/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]                                     # [S,1,D]
        x1, x2 = t[..., : d // 2], t[..., d // 2:]
        return t * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()

    def attention(self, x, layer, positions):
        prefix = f"transformer.h.{layer}.attn."
        hidden = self.heads * self.head_dim
        q, k, v = self.linear(x, prefix + "c_attn", bias=True).split(hidden, dim=-1)           # 3 x [S,H]
        q, k, v = (t.reshape(x.shape[0], self.heads, self.head_dim) for t in (q, k, v))        # [S,N,D]
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        if self.past is not None and len(self.past) > layer:
            k = torch.cat([self.past[layer][0], k])                                             # [T,N,D]
            v = torch.cat([self.past[layer][1], v])
        self.present.append((k, v))
        total = k.shape[0]
        if self.logn and total > self.seq_length:  # 1-based position i scaled by log_{seq_length}(i)
            scale = [math.log(p + 1, self.seq_length) if p + 1 > self.seq_length else 1.0 for p in positions.tolist()]
            q = q * torch.tensor(scale, dtype=F64)[:, None, None]
        scores = torch.einsum("snd,tnd->nst", q, k) / math.sqrt(self.head_dim)                  # [N,S,T]
        if x.shape[0] == total:  # Qwen-1 masks causally only when there is no cache
            scores = scores.masked_fill(~torch.ones(total, total, dtype=torch.bool).tril(), float("-inf"))
        out = torch.einsum("nst,tnd->snd", scores.softmax(-1), v).reshape(x.shape[0], hidden)   # [S,H]
        return self.linear(out, prefix + "c_proj")

    # ---- the LM ----------------------------------------------------------------------------------
    def ntk_alpha(self, total: int) -> float:
        if not self.ntk or total <= self.seq_length:
            return 1.0
        return max(2 ** math.ceil(math.log(total / self.seq_length, 2) + 1) - 1, 1)

    def forward(self, embeds: torch.Tensor, use_cache: bool = True) -> torch.Tensor:
        """embeds [S,H] (continuing the cache when there is one) -> logits [S,V]."""
        cached = self.past[0][0].shape[0] if self.past else 0
        if not cached:
            self.alpha = self.ntk_alpha(embeds.shape[0])  # fixed at prefill, reused while decoding
        positions = torch.arange(cached, cached + embeds.shape[0])
        self.present = []
        x = embeds.to(F64)
        for layer in range(self.layers):
            x = x + self.attention(self.rms(x, f"transformer.h.{layer}.ln_1"), layer, positions)
            x = x + self.mlp(self.rms(x, f"transformer.h.{layer}.ln_2"), layer)
        self.past = self.present if use_cache else None
        return self.linear(self.rms(x, "transformer.ln_f"), "lm_head")

    def embed(self, ids: list[int]) -> torch.Tensor:
        return self.w["transformer.wte.weight"][ids]

    def reset(self) -> None:
        self.past, self.alpha = None, 1.0
