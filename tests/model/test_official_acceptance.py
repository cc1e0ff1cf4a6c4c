"""Acceptance: `moe-run --model DIR --json` on an official-layout checkpoint whose mm_image_tower is a local
CLIP directory gives exactly the greedy tokens of an independent implementation of the paper's semantics.

The reference shares no code with moe_llava: it reads the safetensors shards itself, builds transformers'
LlavaForConditionalGeneration, puts per-expert StableLmMLP modules (loaded from the official
`deepspeed_experts.{e}` keys) behind a per-token softmax -> top-2 -> renormalise loop, preprocesses with
its own pad-to-square + transformers' CLIP processor, and decodes greedily by full recomputation.
"""
import json

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlavaConfig,
                          LlavaForConditionalGeneration, StableLmConfig)
from transformers.models.stablelm.modeling_stablelm import StableLmMLP

import cli
from cli_helpers import last_json, run_cli
from tiny import TINY_CLIP, TINY_CLIP_PROCESSOR, VOCAB, write_tiny_checkpoint

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_ID = VOCAB - 1


class PaperMoE(torch.nn.Module):
    """top-2 of E experts per token, weights = renormalised softmax probabilities, router in fp32."""

    def __init__(self, wg: torch.Tensor, experts: list[torch.nn.Module]):
        super().__init__()
        self.wg, self.experts = wg, torch.nn.ModuleList(experts)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        out = torch.zeros_like(flat)
        probs = torch.softmax(flat.float() @ self.wg.float().T, dim=-1)
        for t in range(flat.shape[0]):
            order = sorted(range(probs.shape[1]), key=lambda e: -probs[t, e].item())[:2]
            total = sum(probs[t, e] for e in order)
            for e in order:
                out[t] += (probs[t, e] / total) * self.experts[e](flat[t:t + 1])[0]
        return out.reshape(x.shape)


def read_checkpoint(directory):
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    state = {}
    for name in sorted(set(index.values())):
        with safe_open(str(directory / name), "pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


def reference_model(directory, tower_dir):
    cfg = json.loads((directory / "config.json").read_text())
    text = StableLmConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                          intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
                          num_attention_heads=cfg["num_attention_heads"],
                          num_key_value_heads=cfg["num_key_value_heads"], partial_rotary_factor=cfg["rope_pct"],
                          rope_theta=cfg["rope_theta"], layer_norm_eps=cfg["norm_eps"],
                          use_qkv_bias=cfg["use_qkv_bias"], max_position_embeddings=512)
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig.from_pretrained(tower_dir), text_config=text, image_token_id=IMAGE_ID,
        projector_hidden_act="gelu", vision_feature_layer=cfg["mm_vision_select_layer"],
        vision_feature_select_strategy="default")).eval()
    llava.model.vision_tower.load_state_dict(CLIPVisionModel.from_pretrained(tower_dir).state_dict())
    state = read_checkpoint(directory)
    mapped = {}
    for key, value in state.items():
        if ".deepspeed_moe." in key or key.startswith("model.image_tower."):
            continue
        key = (key.replace("model.mm_projector.image_spatial_proj.0.", "model.multi_modal_projector.linear_1.")
                  .replace("model.mm_projector.image_spatial_proj.2.", "model.multi_modal_projector.linear_2.")
                  .replace("model.", "model.language_model.", 1) if key.startswith("model.") else key)
        key = key.replace("model.language_model.multi_modal_projector.", "model.multi_modal_projector.")
        mapped[key] = value
    missing, unexpected = llava.load_state_dict(mapped, strict=False)
    assert not unexpected
    for layer in cfg["moe"]["moe_layers_idx"]:
        prefix = f"model.layers.{layer}.mlp.deepspeed_moe."
        experts = []
        for e in range(cfg["moe"]["num_experts"][0]):
            mlp = StableLmMLP(text)
            mlp.load_state_dict({n: state[f"{prefix}experts.deepspeed_experts.{e}.{n}"]
                                 for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")})
            experts.append(mlp)
        llava.model.language_model.layers[layer].mlp = PaperMoE(state[prefix + "gate.wg.weight"], experts)
    # only the dense MLPs that MoE layers replaced, and the tower, loaded above from its own directory
    assert all(".mlp." in k or k.startswith("model.vision_tower.") for k in missing)
    return llava


def reference_tokens(llava, directory, tower_dir, image, question, steps):
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    side = max(image.size)
    mean = json.loads((tower_dir / "preprocessor_config.json").read_text())["image_mean"]
    canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    pixels = CLIPImageProcessorPil.from_pretrained(tower_dir)(canvas, return_tensors="pt")["pixel_values"]
    patches = (TINY_CLIP["image_size"] // TINY_CLIP["patch_size"]) ** 2
    before, after = f"{SYSTEM} USER: <image>\n{question} ASSISTANT:".split("<image>")
    ids = tokenizer.encode(before).ids + [IMAGE_ID] * patches + tokenizer.encode(after).ids
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(llava(input_ids=torch.tensor([ids + out]), pixel_values=pixels).logits[0, -1].argmax())
            if token == tokenizer.token_to_id("<|endoftext|>"):
                break
            out.append(token)
    return out


def test_moe_run_matches_an_independent_implementation(tmp_path, capsys):
    ckpt, tower_dir = tmp_path / "MoE-LLaVA-tiny", tmp_path / "clip-local"
    write_tiny_checkpoint(ckpt, "stablelm", seed=11, max_shard_bytes=150_000)
    torch.manual_seed(12)
    tower = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in TINY_CLIP.items() if k != "model_type"}))
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tower.save_pretrained(tower_dir)
    (tower_dir / "preprocessor_config.json").write_text(json.dumps(TINY_CLIP_PROCESSOR))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mm_image_tower"] = str(tower_dir)                  # as released: a tower name, here a local dir
    for key in ("image_tower_config", "image_processor_config"):
        cfg.pop(key, None)                                  # official configs carry no embedded tower config
    (ckpt / "config.json").write_text(json.dumps(cfg))

    image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (37, 61, 3), dtype=np.uint8))
    image_path = tmp_path / "photo.png"
    image.save(image_path)
    code, out, err = run_cli(cli.run_main, ["--model", str(ckpt), "--image", str(image_path), "--prompt",
                                            "What is in the image?", "--max-new-tokens", "8", "--json"], capsys)
    assert code == 0, err
    got = last_json(out)["token_ids"]
    want = reference_tokens(reference_model(ckpt, tower_dir), ckpt, tower_dir, image, "What is in the image?", 8)
    assert len(want) >= 4 and got == want
