"""Batched greedy decoding on the PyTorch model, for evaluation, with routing capture.

Prompts are spliced exactly as in training (`model.splice`), then left-aligned so that every row's last
prompt token sits at the same position; position ids count real tokens only, so each row decodes exactly
as it would alone (tests hold batched == one-by-one). Eval-mode MoE is dropless, so batching does not
change routing either.

Shapes: B batch, S prompt positions (text + visual tokens), H hidden, V vocab, K active experts.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from runtime.prompt import IMAGE_TOKEN_INDEX

from ..model import MoELlavaForCausalLM
from ..moe import route

PAD, TEXT, IMAGE = 0, 1, 2  # token modality codes


def modality(ids: list[int], visual_tokens: int, max_length: int) -> torch.Tensor:
    """[S] TEXT/IMAGE code of every position after the splice (cut to max_length, as `splice` cuts)."""
    codes: list[int] = []
    for i in ids:
        codes += [IMAGE] * visual_tokens if i == IMAGE_TOKEN_INDEX else [TEXT]
    return torch.tensor(codes[:max_length], dtype=torch.long)


def left_align(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Right-padded [B,S,...] -> left-padded (each row rolled right by its padding)."""
    return torch.stack([row.roll(x.shape[1] - n, dims=0) for row, n in zip(x, lengths)])


class RoutingRecorder:
    """Counts, per MoE layer and modality, how often each expert is chosen (top-k and top-1) on prompts."""

    def __init__(self, model: MoELlavaForCausalLM):
        self.layers = {i: layer.mlp for i, layer in enumerate(model.layers) if layer.mlp in model.moe_layers()}
        self.active, self._pending = False, {}
        self.counts = {i: {m: torch.zeros(moe.num_experts, dtype=torch.long) for m in ("text", "image")}
                       for i, moe in self.layers.items()}
        self.top1 = {i: {m: torch.zeros_like(c) for m, c in per.items()} for i, per in self.counts.items()}
        self.tokens = {"text": 0, "image": 0}
        self._hooks = [moe.register_forward_hook(self._hook(i)) for i, moe in self.layers.items()]

    def _hook(self, idx: int):
        def hook(module, inputs, _output):
            if self.active:
                x = inputs[0]                                                        # [B,S,H]
                _, experts = route(module.router_logits(x.reshape(-1, x.shape[-1])), module.top_k)
                self._pending[idx] = experts.reshape(*x.shape[:-1], -1)              # [B,S,K]
        return hook

    def commit(self, codes: torch.Tensor) -> None:
        """Attribute the pending prefill routing to modalities; codes [B,S] (PAD/TEXT/IMAGE)."""
        for idx, experts in self._pending.items():
            for name, code in (("text", TEXT), ("image", IMAGE)):
                chosen = experts[codes == code]                                      # [n,K]
                num = self.counts[idx][name].numel()
                self.counts[idx][name] += torch.bincount(chosen.flatten(), minlength=num)
                self.top1[idx][name] += torch.bincount(chosen[:, 0], minlength=num)
        self.tokens["text"] += int((codes == TEXT).sum())
        self.tokens["image"] += int((codes == IMAGE).sum())
        self._pending = {}

    def summary(self) -> dict:
        def share(c: torch.Tensor) -> list[float]:
            return [round(v, 4) for v in (c.float() / c.sum().clamp(min=1)).tolist()]
        if not self.layers:
            return {}
        first = next(iter(self.layers.values()))
        return {"moe_layers": list(self.layers), "num_experts": first.num_experts, "top_k": first.top_k,
                "tokens": dict(self.tokens),
                "load": {str(i): {m: share(c) for m, c in per.items()} for i, per in self.counts.items()},
                "top1": {str(i): {m: share(c) for m, c in per.items()} for i, per in self.top1.items()}}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


@torch.inference_mode()
def greedy_generate(model: MoELlavaForCausalLM, prompts: list[list[int]], pixel_values: torch.Tensor | None,
                    eos_token_id: int, max_new_tokens: int, recorder: RoutingRecorder | None = None) -> list[list[int]]:
    """Greedy continuations (without the end token) of a batch of prompts; images in prompt order."""
    model.eval()
    image_embeds = model.encode_images(pixel_values) if pixel_values is not None else None
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])                 # [B,L]
    mask = torch.tensor([[1] * len(p) + [0] * (longest - len(p)) for p in prompts])
    embeds, mask, _ = model.splice(ids, image_embeds, mask)                               # [B,S,H], [B,S]
    lengths = mask.sum(1).tolist()
    embeds, mask = left_align(embeds, lengths), left_align(mask, lengths)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)                                       # [B,S]
    cache = DynamicCache(config=model.language_model.config)
    if recorder is not None:
        recorder.active = True
    logits = _forward(model, embeds, mask, positions, cache)
    if recorder is not None:
        recorder.active = False
        visual = image_embeds.shape[1] if image_embeds is not None else 0
        codes = [modality(q, visual, model.model_max_length) for q in prompts]
        recorder.commit(left_align(torch.nn.utils.rnn.pad_sequence(codes, batch_first=True), lengths))
    return _decode_loop(model, logits, mask, positions[:, -1], cache, eos_token_id, max_new_tokens)


def _forward(model, embeds, mask, positions, cache) -> torch.Tensor:
    """Next-token logits [B,V] after feeding `embeds` [B,s,H] (the cache grows by s)."""
    out = model.language_model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                     cache=cache, use_cache=True)
    return model.language_model.lm_head(out.last_hidden_state[:, -1]).float()


def _decode_loop(model, logits, mask, last_pos, cache, eos, max_new_tokens) -> list[list[int]]:
    batch = logits.shape[0]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)                                                         # [B]
        done_now = done | (token == eos)
        for b in (~done_now).nonzero().flatten().tolist():
            outputs[b].append(int(token[b]))
        done = done_now
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        last_pos = last_pos + 1
        logits = _forward(model, model.embed_tokens(token[:, None]), mask, last_pos[:, None], cache)
    return outputs
