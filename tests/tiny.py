"""Tiny MoE-LLaVA fixtures (2-4 layers, 4 experts, hidden 32-64), built by one helper for every test."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from moe_llava.config import MoELlavaConfig
from moe_llava.loading import build_model, save_pretrained

TINY_CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                 num_attention_heads=4, image_size=28, patch_size=7, projection_dim=16,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)
TINY_CLIP_PROCESSOR = dict(image_processor_type="CLIPImageProcessor", do_resize=True,
                           size={"shortest_edge": 28}, resample=3, do_center_crop=True,
                           crop_size={"height": 28, "width": 28}, do_rescale=True, rescale_factor=1 / 255,
                           do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                           image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)
TINY_SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4, image_size=28, patch_size=7, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6, num_channels=3)
TINY_SIGLIP_PROCESSOR = dict(image_processor_type="SiglipImageProcessor", do_resize=True,
                             size={"height": 28, "width": 28}, resample=3, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
                             image_std=[0.5, 0.5, 0.5])
VOCAB = 384

_STABLELM = dict(model_type="moe_llava_stablelm", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, hidden_act="silu",
                 rope_pct=0.25, rope_theta=10000, norm_eps=1e-5, use_qkv_bias=True,
                 max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=None, eos_token_id=0)
_PHI = dict(model_type="moe_llava_phi", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
            num_hidden_layers=4, num_attention_heads=4, hidden_act="gelu_new", partial_rotary_factor=0.5,
            rope_theta=10000, layer_norm_eps=1e-5, max_position_embeddings=512, qk_layernorm=False,
            resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=0)
# Qwen-1 field names; intermediate_size counts both MLP branches (FFN width 96). No eos_token_id, as
# released: the end token is the tokenizer's <|endoftext|>, the first id after the BPE ranks.
QWEN_MERGES = 176
QWEN_VOCAB = 256 + QWEN_MERGES + 208  # byte ranks + merges + Qwen's 208 special tokens
_QWEN = dict(model_type="moe_llava_qwen", vocab_size=QWEN_VOCAB, hidden_size=64, intermediate_size=192,
             num_hidden_layers=4, num_attention_heads=4, kv_channels=16, rotary_pct=1.0, rotary_emb_base=10000,
             layer_norm_epsilon=1e-6, seq_length=256, max_position_embeddings=256, no_bias=True,
             use_dynamic_ntk=True, use_logn_attn=True, emb_dropout_prob=0.0, attn_dropout_prob=0.0,
             tie_word_embeddings=False)
_FAMILIES = {"stablelm": _STABLELM, "phi": _PHI, "qwen": _QWEN}


def tiny_config(family: str = "stablelm", moe: bool = True, num_experts: int = 4, top_k: int = 2,
                tower: str = "clip", **overrides) -> MoELlavaConfig:
    d = dict(_FAMILIES[family])
    d.update(overrides)
    siglip = tower == "siglip"
    d.update(mm_image_tower="tiny-siglip" if siglip else "tiny-clip", mm_hidden_size=32,
             image_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
             image_aspect_ratio="pad", image_tower_config=TINY_SIGLIP if siglip else TINY_CLIP,
             image_processor_config=TINY_SIGLIP_PROCESSOR if siglip else TINY_CLIP_PROCESSOR,
             moe=dict(moe_enable=moe, moe_mode="sparse", moe_layers_idx=None, num_experts=[num_experts],
                      top_k_experts=top_k, capacity_factor=1.5, eval_capacity_factor=2.0, min_capacity=0,
                      ep_size=1, use_residual=False, router_aux_loss_coef=0.01,
                      train_modules=["mlp.w1", "mlp.w2", "mlp.c_proj", "wg"]))
    return MoELlavaConfig.from_dict(d)


def tiny_model(family: str = "stablelm", seed: int = 0, **kwargs):
    """A randomly initialised tiny model; weights scaled up so routing and logits are not degenerate."""
    torch.manual_seed(seed)
    model, _ = build_model(tiny_config(family, **kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(std=0.5)
            elif p.dim() >= 2 and "embeddings" not in name:
                p.normal_(std=0.08)
    return model.eval()


def tiny_tokenizer(directory: Path):
    """A byte-level BPE tokenizer (ids < VOCAB) saved as tokenizer.json in `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:",
              "What is in the image? Describe the picture. a red circle and a blue square on the left"] * 20
    tok.train_from_iterator(corpus, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return tok


def write_tiny_checkpoint(directory: Path, family: str = "stablelm", seed: int = 0,
                          max_shard_bytes: int = 2 << 30, **kwargs):
    """An official-layout checkpoint dir (config.json, safetensors, tokenizer.json); returns the model."""
    model = tiny_model(family, seed, **kwargs)
    tokenizer_dir = directory / "_tok"
    (tiny_qwen_tiktoken if family == "qwen" else tiny_tokenizer)(tokenizer_dir)
    save_pretrained(model, directory, tokenizer_dir, max_shard_bytes)
    return model


def train_tiktoken_ranks(corpus: list[str], merges: int) -> dict[bytes, int]:
    """Byte-level BPE trained on `corpus` (split by Qwen's regex), as tiktoken ranks: the 256 bytes, then one
    token per merge, most frequent pair first."""
    from collections import Counter

    import regex
    from moe_llava.qwen import PATTERN
    counts = Counter(piece.encode() for text in corpus for piece in regex.findall(PATTERN, text))
    words = {w: [w[i:i + 1] for i in range(len(w))] for w in counts}
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < 256 + merges:
        pairs = Counter()
        for w, parts in words.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += counts[w]
        if not pairs:
            break
        a, b = max(pairs, key=lambda p: (pairs[p], p))
        ranks.setdefault(a + b, len(ranks))
        for w, parts in words.items():
            i, merged = 0, []
            while i < len(parts):
                take = i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b
                merged.append(a + b if take else parts[i])
                i += 2 if take else 1
            words[w] = merged
    return ranks


QWEN_CORPUS = ["这是一张图片。图片里有一个红色的圆和一个蓝色的正方形。", "def forward(self, x):\n    return x + 1\n",
               "What's in the image? It's a photo; they're 12 cats and 3 dogs."]


def write_tiktoken(ranks: dict[bytes, int], path: Path) -> Path:
    import base64
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ordered))
    return path


def tiny_qwen_tiktoken(directory: Path, merges: int = QWEN_MERGES) -> Path:
    """A qwen.tiktoken (and no tokenizer.json) whose BPE was trained here on chat-template text, CJK and code."""
    from moe_llava.data.tokenizer import template_texts
    ranks = train_tiktoken_ranks(template_texts() * 8 + QWEN_CORPUS * 4, merges)
    assert len(ranks) == 256 + merges
    return write_tiktoken(ranks, directory / "qwen.tiktoken")
