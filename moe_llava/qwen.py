"""Qwen-1 (`moe_llava_qwen`): config, official key layout and tokenizer, on transformers' Qwen2 modules.

Why Qwen2 modules: within its training context (`seq_length` positions) a Qwen-1 block is a Qwen2 block.
  x -> RMSNorm ln_1 (eps layer_norm_epsilon) -> attention: q|k|v fused in c_attn WITH bias, full rotary
  (rotate-half, base rotary_emb_base), softmax(q k^T / sqrt(kv_channels)) v, c_proj WITHOUT bias -> + x
    -> RMSNorm ln_2 -> c_proj(w1(h) * silu(w2(h))), width intermediate_size // 2 -> + residual
That is Qwen2's q/k/v_proj (bias) + o_proj (no bias) + down(silu(gate h) * up h) with gate = w2, up = w1,
so only the keys and the config field names need translating; tests/qwen proves the equality against an
independent re-implementation of the Qwen-1 block that reads the official keys.

Capped, not implemented: past `seq_length` positions Qwen-1 switches to dynamic-NTK rotary and log-n query
scaling (use_dynamic_ntk / use_logn_attn). We refuse those positions instead (a UserError in PyTorch; the
export's decoder.max_positions is `context_length`), so every position we compute is one Qwen-1 computes alike.
Two more reference behaviours we do not copy, neither reachable by prompt-then-one-token-at-a-time decoding
(the only way the toolkit calls the decoder): Qwen-1 takes rotary positions from the cache length and ignores
`position_ids` (the same for one unpadded sequence), and with a cache it drops the causal mask among several new
tokens. In fp16 Qwen-1 rotates in fp32 and casts after, Qwen2 casts cos/sin first (last-bit differences).

Official layout (Qwen-1 / MoE-LLaVA-Qwen)                    canonical (transformers names, as StableLM/Phi)
transformer.wte / transformer.ln_f / lm_head                 model.embed_tokens / model.norm / lm_head
transformer.h.{i}.ln_1 / .ln_2                               model.layers.{i}.{input,post_attention}_layernorm
transformer.h.{i}.attn.c_attn.{weight [3P,H], bias [3P]}     model.layers.{i}.self_attn.{q,k,v}_proj (thirds, in order)
transformer.h.{i}.attn.c_proj                                model.layers.{i}.self_attn.o_proj
transformer.h.{i}.mlp.{w2,w1,c_proj}                         model.layers.{i}.mlp.{gate,up,down}_proj
  (also inside ...mlp.deepspeed_moe.experts.deepspeed_experts.{e}.)
transformer.h.{i}.mlp.deepspeed_moe.gate.wg                  model.layers.{i}.mlp.deepspeed_moe.gate.wg
transformer.{mm_projector,image_tower}.*                     model.{mm_projector,image_tower}.*
Reading leaves unknown keys as they are, so a `model.mm_projector` / `model.image_tower` spelling loads too.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from runtime.errors import UserError

# ---- config ---------------------------------------------------------------------------------------
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels",
            "intermediate_size", "layer_norm_epsilon", "seq_length")
DEFAULTS = dict(rotary_pct=1.0, rotary_emb_base=10000, no_bias=True, use_dynamic_ntk=True, use_logn_attn=True,
                attn_dropout_prob=0.0, tie_word_embeddings=False)


def check_config(fields: dict) -> None:
    """Qwen-1 field names present and within what the Qwen2 modules express; UserError naming the field."""
    missing = [k for k in REQUIRED if k not in fields]
    if missing:
        raise UserError(f"model_type moe_llava_qwen, but config.json lacks the Qwen-1 field(s) {missing}; "
                        "is it a Qwen-1 checkpoint?")
    f = {**DEFAULTS, **fields}
    if f["kv_channels"] * f["num_attention_heads"] != f["hidden_size"]:
        raise UserError(f"Qwen-1 kv_channels ({f['kv_channels']}) x num_attention_heads "
                        f"({f['num_attention_heads']}) must equal hidden_size ({f['hidden_size']})")
    if float(f["rotary_pct"]) != 1.0:
        raise UserError(f"Qwen-1 rotary_pct {f['rotary_pct']} unsupported: only full rotary (1.0) is")
    if not f["no_bias"]:
        raise UserError("Qwen-1 no_bias=false (biased MLP / c_proj) is unsupported; the released models use true")
    if f["intermediate_size"] % 2:
        raise UserError(f"Qwen-1 intermediate_size {f['intermediate_size']} counts both MLP branches: must be even")


def ffn_size(fields: dict) -> int:
    """Width of one MLP branch: Qwen-1's intermediate_size counts w1 and w2 together."""
    return int(fields["intermediate_size"]) // 2


def context_length(fields: dict) -> int:
    """Positions we compute: `seq_length` (beyond it Qwen-1 rescales rotary / queries, which we do not)."""
    f = {**DEFAULTS, **fields}
    if f["use_dynamic_ntk"] or f["use_logn_attn"]:
        return int(f["seq_length"])
    return max(int(f["seq_length"]), int(f.get("max_position_embeddings", 0)))  # plain rotary: no switch


def hf_config(fields: dict):
    """Released Qwen-1 fields -> transformers Qwen2Config of the same block."""
    from transformers import Qwen2Config
    check_config(fields)
    f = {**DEFAULTS, **fields}
    heads = int(f["num_attention_heads"])
    return Qwen2Config(
        vocab_size=int(f["vocab_size"]), hidden_size=int(f["hidden_size"]), intermediate_size=ffn_size(f),
        num_hidden_layers=int(f["num_hidden_layers"]), num_attention_heads=heads, num_key_value_heads=heads,
        hidden_act="silu", max_position_embeddings=context_length(f), rms_norm_eps=float(f["layer_norm_epsilon"]),
        rope_parameters={"rope_type": "default", "rope_theta": float(f["rotary_emb_base"])},
        attention_dropout=float(f["attn_dropout_prob"]), tie_word_embeddings=bool(f["tie_word_embeddings"]),
        use_sliding_window=False, bos_token_id=f.get("bos_token_id"), eos_token_id=f.get("eos_token_id"),
        pad_token_id=f.get("pad_token_id"))


def causal_lm(hf):
    """Qwen2ForCausalLM whose decoder refuses positions past the context length (outside tracing)."""
    from transformers import Qwen2ForCausalLM
    lm = Qwen2ForCausalLM(hf)
    lm.model.register_forward_pre_hook(_context_guard(hf.max_position_embeddings), with_kwargs=True)
    return lm


def _context_guard(limit: int):
    def guard(_module, args, kwargs):
        if torch.compiler.is_compiling():  # export: the manifest's max_positions carries the cap instead
            return
        tokens = kwargs.get("inputs_embeds")
        tokens = tokens if tokens is not None else kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache")
        total = (cache.get_seq_length() if cache is not None else 0) + tokens.shape[1]
        if total > limit:
            raise UserError(f"{total} positions exceed Qwen-1's seq_length {limit} (past it Qwen-1 switches to "
                            "dynamic-NTK rotary / log-n attention, which this toolkit does not implement); "
                            "use a shorter prompt or fewer new tokens")
    return guard


# ---- official key layout <-> canonical --------------------------------------------------------------
_LAYER, _EXPERT = r"(\d+)", r"mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\."
# (canonical, official) key prefixes; `{L}` a layer index, `{E}` an expert prefix with its index
_RENAMES = [("model.embed_tokens.", "transformer.wte."), ("model.norm.", "transformer.ln_f."),
            ("model.mm_projector.", "transformer.mm_projector."), ("model.image_tower.", "transformer.image_tower."),
            ("model.layers.{L}.input_layernorm.", "transformer.h.{L}.ln_1."),
            ("model.layers.{L}.post_attention_layernorm.", "transformer.h.{L}.ln_2."),
            ("model.layers.{L}.self_attn.o_proj.", "transformer.h.{L}.attn.c_proj."),
            ("model.layers.{L}.mlp.deepspeed_moe.gate.", "transformer.h.{L}.mlp.deepspeed_moe.gate.")]
_RENAMES += [(f"model.layers.{{L}}.{where}{ours}.", f"transformer.h.{{L}}.{where}{theirs}.")
             for where in ("mlp.", "{E}")
             for ours, theirs in (("gate_proj", "w2"), ("up_proj", "w1"), ("down_proj", "c_proj"))]
_QKV = ("q_proj", "k_proj", "v_proj")


def _pattern(template: str) -> re.Pattern:
    escaped = re.escape(template).replace(r"\{L\}", _LAYER).replace(r"\{E\}", _EXPERT)
    return re.compile("^" + escaped)


def _fill(template: str, groups: tuple[str, ...]) -> str:
    out = template.replace("{L}", "{}").replace("{E}", "mlp.deepspeed_moe.experts.deepspeed_experts.{}.")
    return out.format(*groups)


_TO_CANONICAL = [(_pattern(theirs), ours) for ours, theirs in _RENAMES]
_TO_OFFICIAL = [(_pattern(ours), theirs) for ours, theirs in _RENAMES]
_C_ATTN = re.compile(r"^transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)$")
_SPLIT_QKV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)$")


def _rename(key: str, rules) -> str:
    for pattern, template in rules:
        if m := pattern.match(key):
            return _fill(template, m.groups()) + key[m.end():]
    return key


def to_canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Qwen-1 keys -> canonical keys; the fused c_attn split into q/k/v thirds."""
    out = {}
    for key, tensor in state.items():
        if m := _C_ATTN.match(key):
            for name, part in zip(_QKV, tensor.chunk(3, dim=0)):               # [3P,H] -> 3 x [P,H]
                out[f"model.layers.{m[1]}.self_attn.{name}.{m[2]}"] = part
        else:
            out[_rename(key, _TO_CANONICAL)] = tensor
    return out


def to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `to_canonical`: q/k/v fused back into c_attn (q rows, then k, then v)."""
    out, qkv = {}, {}
    for key, tensor in state.items():
        if m := _SPLIT_QKV.match(key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = tensor
        else:
            out[_rename(key, _TO_OFFICIAL)] = tensor
    for (layer, kind), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise UserError(f"layer {layer}: {kind} of {sorted(set(_QKV) - set(parts))} missing, cannot fuse c_attn")
        out[f"transformer.h.{layer}.attn.c_attn.{kind}"] = torch.cat([parts[n] for n in _QKV])  # [3P,...]
    return out


# ---- tokenizer: qwen.tiktoken -> tokenizers.Tokenizer ---------------------------------------------
TIKTOKEN_FILE = "qwen.tiktoken"
# Qwen-1's pre-tokenisation regex (its tokenization_qwen.py PAT_STR); single digits, unlike cl100k's \p{N}{1,3}
PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# ids right after the ranks (151643.. for the released file, the number the reference hard-codes)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205))


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one `base64(token) rank` per line."""
    import base64
    ranks = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise UserError(f"{path}:{number}: not a tiktoken BPE line (base64 token, rank)") from None
    return ranks


def tokenizer_from_tiktoken(path: str | Path):
    """The HF `tokenizers` equivalent of Qwen-1's tiktoken tokenizer (NFC, Qwen regex, byte-level BPE, specials).

    transformers' TikTokenConverter rebuilds the BPE merges from the ranks; we feed it the ranks ourselves so
    that converting needs no `tiktoken` install.
    """
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = read_tiktoken_ranks(path)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: ranks are not 0..{len(ranks) - 1}; cannot place the special tokens after them")

    class Converter(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(lambda _path: ranks)

    tokenizer = Converter(str(path), pattern=PATTERN, extra_special_tokens=SPECIAL_TOKENS).converted()
    tokenizer.normalizer = normalizers.NFC()  # the reference normalises to NFC before encoding
    assert tokenizer.token_to_id(SPECIAL_TOKENS[0]) == len(ranks), "special tokens must follow the ranks"
    return tokenizer
