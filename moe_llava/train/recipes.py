"""The demo recipe: synthetic scenes -> tower pre-training -> stages I, II, III -> evaluation -> demo model.

Everything is seeded. It runs at one torch thread (`threads`): the demo model is too small for a second
thread to pay, and OpenMP threads stall when another job shares the cores. Its cost is reported as wall and
CPU seconds per part (results.json); the README's Training section has the measured figures. The RQ2
ablation (stage III without stage II) is an analysis, not part of producing the model: `ablation=True`.
The demo backbone is StableLM-shaped (`moe_llava_stablelm`: SwiGLU FFN, LayerNorm, qkv bias, partial
rotary), MoE every other layer (sparse), 4 experts top-2; the tower is CLIP-shaped (96 px, patch 16: 36 image tokens).

Where the vision features come from: no pretrained tower exists offline, so the recipe adds a stage 0
(see tower.py) that pretrains the tower on the training scenes with linear probes (per patch: shape and
colour; per object: shape and colour; per patch: which shapes the image contains) - a stand-in for CLIP
pretraining. From stage I on the tower is frozen, exactly as for real checkpoints
(`--train-tower` exists but is off by default and unused here). There is no pretrained LLM either: the
reference learning rates (1e-3 / 2e-5 / 2e-5) assume a pretrained LLM, so stages II and III use larger
ones and several epochs; stage I keeps the reference 1e-3 (it trains the projector against the frozen,
still random LLM - faithful, and of little use, as the ablation without stage II shows).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..config import MoELlavaConfig
from ..data import conversation_texts, generate_dataset, save_hf_tokenizer, train_demo_tokenizer
from ..data import ObjectStats, PopeSplit, pope_questions
from ..data.synthetic import SyntheticDataset, image_path, load_scenes, record
from ..image_processing import HFImageProcessor
from ..loading import TOKENIZER_FILES, build_model, load_pretrained, load_tokenizer, save_pretrained
from .card import model_card
from .dataset import load_image
from .evaluate import evaluate, format_report, write_json
from .plots import expert_loading
from .run import StageConfig, run_stage
from .stages import Stage
from .tower import ProbeDataset, TowerProbe, probe_targets

EXAMPLE_PROMPT = "What is in the image?"


@dataclass(frozen=True)
class StageRecipe:
    learning_rate: float
    epochs: float
    batch_size: int = 32


@dataclass(frozen=True)
class DemoRecipe:
    seed: int = 0
    n_train: int = 3000           # training scenes (captions: 1 each, instructions: 2 each + 3 % text-only)
    n_heldout: int = 150          # evaluation scenes (never trained on)
    vocab_size: int = 1024        # BPE target; the synthetic corpus saturates below it
    hidden: int = 128
    ffn: int = 256
    layers: int = 4
    heads: int = 4
    max_length: int = 256
    tower_width: int = 96
    tower_layers: int = 4
    image_size: int = 96
    patch_size: int = 16
    num_experts: int = 4
    top_k: int = 2
    drills: bool = True           # add existence drills (multi-turn yes/no) to the stage II/III data
    tower: StageRecipe = StageRecipe(2e-3, 30, 64)
    stage1: StageRecipe = StageRecipe(1e-3, 1)
    stage2: StageRecipe = StageRecipe(1e-3, 4)
    stage3: StageRecipe = StageRecipe(5e-4, 1)


DEMO = DemoRecipe()


def demo_config(recipe: DemoRecipe, vocab_size: int) -> MoELlavaConfig:
    """Dense (moe_enable: false) demo config; the moe dict says what stage III will build."""
    r = recipe
    tower = dict(model_type="clip_vision_model", hidden_size=r.tower_width, intermediate_size=4 * r.tower_width,
                 num_hidden_layers=r.tower_layers, num_attention_heads=4, image_size=r.image_size,
                 patch_size=r.patch_size, projection_dim=r.tower_width, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, num_channels=3)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    processor = dict(image_processor_type="CLIPImageProcessor", do_resize=True, size={"shortest_edge": r.image_size},
                     resample=3, do_center_crop=True, crop_size={"height": r.image_size, "width": r.image_size},
                     do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=mean, image_std=std,
                     do_convert_rgb=True)
    return MoELlavaConfig.from_dict(dict(
        model_type="moe_llava_stablelm", vocab_size=-(-vocab_size // 64) * 64, hidden_size=r.hidden,
        intermediate_size=r.ffn, num_hidden_layers=r.layers, num_attention_heads=r.heads,
        num_key_value_heads=r.heads, hidden_act="silu", rope_pct=0.25, rope_theta=10000, norm_eps=1e-5,
        use_qkv_bias=True, max_position_embeddings=2 * r.max_length, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=0, tokenizer_model_max_length=r.max_length,
        mm_image_tower="moe-llava-demo-clip", mm_hidden_size=r.tower_width, image_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", image_aspect_ratio="pad",
        image_tower_config=tower, image_processor_config=processor,
        moe=dict(moe_enable=False, moe_mode="sparse", moe_layers_idx=None, num_experts=[r.num_experts],
                 top_k_experts=r.top_k, capacity_factor=1.5, eval_capacity_factor=2.0, min_capacity=0, ep_size=1,
                 use_residual=False, router_aux_loss_coef=0.01, train_modules=[])))


def prepare_data(recipe: DemoRecipe, work: Path) -> tuple[SyntheticDataset, Path]:
    data = generate_dataset(work / "data", recipe.n_train, recipe.n_heldout, recipe.seed)
    tokenizer = train_demo_tokenizer(conversation_texts([data.captions_json, data.instruct_json]), recipe.vocab_size)
    return data, save_hf_tokenizer(tokenizer, work / "tokenizer", recipe.max_length)


def existence_drills(data: SyntheticDataset, seed: int) -> list[dict]:
    """One multi-turn record per training scene asking POPE-style existence questions (balanced yes/no,
    negatives drawn with a random POPE strategy per scene), built with the data module's own question
    code. Training scenes only; the held-out POPE sets stay unseen."""
    scenes = load_scenes(data, "train")
    stats = ObjectStats.from_scenes(list(scenes.values()))
    records = []
    for i, (sid, scene) in enumerate(scenes.items()):
        rng = np.random.default_rng([seed, 7, i])
        split = list(PopeSplit)[rng.integers(len(PopeSplit))]
        records.append(record(f"{sid}-drill", pope_questions(scene, split, stats, rng), image_path(sid)))
    return records


def stage2_data(data: SyntheticDataset, work: Path, seed: int, drills: bool) -> Path:
    """The instruction set, plus (if `drills`) the existence drills, shuffled together."""
    if not drills:
        return data.instruct_json
    records = json.loads(data.instruct_json.read_text()) + existence_drills(data, seed)
    order = np.random.default_rng([seed, 8]).permutation(len(records))
    path = work / "instruct_with_drills.json"
    path.write_text(json.dumps([records[k] for k in order]) + "\n")
    return path


def probe_data(data: SyntheticDataset, split: str, processor: HFImageProcessor, recipe: DemoRecipe) -> ProbeDataset:
    rows: dict[str, list] = {}
    for sid, scene in load_scenes(data, split).items():
        rows.setdefault("pixel_values", []).append(processor(load_image(data.images_dir / f"{sid}.png", sid)))
        for key, value in probe_targets(scene, recipe.image_size, recipe.patch_size).items():
            rows.setdefault(key, []).append(value)
    return ProbeDataset({k: torch.from_numpy(np.stack(v)) for k, v in rows.items()})


def pretrain_tower(recipe: DemoRecipe, data: SyntheticDataset, tokenizer_dir: Path, out: Path,
                   progress: bool = True) -> Path:
    """Stage 0: a fresh dense demo model whose tower is pretrained with the probes of tower.py."""
    from transformers import Trainer, TrainingArguments
    torch.manual_seed(recipe.seed)
    model, _ = build_model(demo_config(recipe, load_tokenizer(tokenizer_dir).get_vocab_size()))
    probe = TowerProbe(model.vision_tower)
    processor = HFImageProcessor(model.vision_tower.spec.processor)
    train = probe_data(data, "train", processor, recipe)
    t = recipe.tower
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=t.batch_size,
                             learning_rate=t.learning_rate, num_train_epochs=t.epochs, lr_scheduler_type="cosine",
                             warmup_steps=0.05, max_grad_norm=1.0, weight_decay=0.0, logging_steps=20,
                             save_strategy="no", report_to="none", seed=recipe.seed, data_seed=recipe.seed,
                             remove_unused_columns=False, disable_tqdm=not progress, dataloader_pin_memory=False)
    trainer = Trainer(model=probe, args=args, train_dataset=train)
    trainer.train()
    probe.eval()
    save_pretrained(model, out, tokenizer_dir)
    stats = {"train": probe.accuracy(train.tensors),
             "heldout": probe.accuracy(probe_data(data, "heldout", processor, recipe).tensors),
             "steps": trainer.state.global_step, "log": trainer.state.log_history}
    (out / "stage.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"stage 0 (tower): object shape/colour accuracy on held-out scenes {stats['heldout']}")
    return out


def stage_config(stage: Stage, model: Path, data: Path, images: Path, out: Path, r: StageRecipe,
                 seed: int, progress: bool) -> StageConfig:
    # Random batches, although a third of each is padding: length-grouped batches (with the constant loss
    # normaliser) cut stage II's CPU time by ~13 % only, and the model then answered "yes" to every POPE probe.
    return StageConfig(stage=stage, model=model, data=data, out=out, image_folder=images, learning_rate=r.learning_rate,
                       epochs=r.epochs, batch_size=r.batch_size, global_batch_size=r.batch_size, seed=seed,
                       save_steps=10 ** 9, logging_steps=10, cache_images=True, progress=progress)


def run_demo(out: Path, work: Path, recipe: DemoRecipe = DEMO, ablation: bool = False, progress: bool = True,
             threads: int | None = None) -> dict:
    """The whole recipe; returns results.json's content. `out` receives the final (stage III) model.
    `ablation`: also train and evaluate the RQ2 model (stage III without stage II). `threads`: torch threads
    for the run (None: leave as is)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_demo(out, Path(work), recipe, ablation, progress)
    finally:
        torch.set_num_threads(previous)


class Clock:
    """Wall and CPU seconds of each part of the recipe. CPU time (all threads, user + system) is what the
    part costs on an otherwise idle machine; on a shared one the wall time is longer by the others' share."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._start = self._last = (time.time(), time.process_time())

    def lap(self, name: str) -> None:
        now = (time.time(), time.process_time())
        self.wall[name], self.cpu[name] = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now

    def report(self) -> dict:
        total = (self._last[0] - self._start[0], self._last[1] - self._start[1])
        return {"seconds": {k: round(v, 1) for k, v in self.wall.items()} | {"total": round(total[0], 1)},
                "cpu_seconds": {k: round(v, 1) for k, v in self.cpu.items()} | {"total": round(total[1], 1)}}


def _run_demo(out: Path, work: Path, recipe: DemoRecipe, ablation: bool, progress: bool) -> dict:
    clock = Clock()
    work.mkdir(parents=True, exist_ok=True)
    data, tokenizer_dir = prepare_data(recipe, work)
    clock.lap("data")
    stage0 = pretrain_tower(recipe, data, tokenizer_dir, work / "stage0", progress)
    clock.lap("stage0")
    runs = {}
    instruct = stage2_data(data, work, recipe.seed, recipe.drills)
    plan = [("stage1", Stage.PRETRAIN, stage0, data.captions_json, recipe.stage1),
            ("stage2", Stage.FINETUNE, work / "stage1", instruct, recipe.stage2),
            ("stage3", Stage.MOE, work / "stage2", instruct, recipe.stage3)]
    if ablation:  # RQ2: MoE trained right after stage I, without stage II
        plan.append(("stage3_without_stage2", Stage.MOE, work / "stage1", instruct, recipe.stage3))
    for name, stage, init, json_path, r in plan:
        runs[name] = run_stage(stage_config(stage, init, json_path, data.root, work / name, r, recipe.seed, progress))
        clock.lap(name)
    results = {"recipe": asdict(recipe), "models": {}}
    for name in ("stage2", "stage3", "stage3_without_stage2"):
        if name in runs:
            loaded = load_pretrained(runs[name])
            results["models"][name] = evaluate(loaded, data.root, progress=progress)
            print(f"== {name}\n{format_report(results['models'][name])}")
    clock.lap("evaluation")
    results |= clock.report()
    publish(runs["stage3"], work, out, data, results)
    return results


def publish(model_dir: Path, work: Path, out: Path, data: SyntheticDataset, results: dict) -> None:
    """The final model + example + results + figures into `out` (e.g. moe_llava/assets/demo)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", *TOKENIZER_FILES):
        if (model_dir / name).is_file():  # TOKENIZER_FILES also lists other families' files (qwen.tiktoken)
            shutil.copy(model_dir / name, out / name)
    shutil.copy(data.root / "images" / "heldout_000000.png", out / "example.png")
    (out / "example_prompt.txt").write_text(EXAMPLE_PROMPT + "\n")
    write_json(results, out / "results.json")
    for stage in ("stage1", "stage2", "stage3"):
        if (work / stage / "loss.png").is_file():
            shutil.copy(work / stage / "loss.png", out / f"loss_{stage}.png")
    expert_loading(results["models"]["stage3"]["routing"], out / "expert_loading.png", "demo model, held-out scenes")
    (out / "README.md").write_text(model_card(results, (out / "model.safetensors").stat().st_size))


def quick(recipe: DemoRecipe = DEMO, **changes) -> DemoRecipe:
    """A variant of the recipe (tests and experiments)."""
    return replace(recipe, **changes)
