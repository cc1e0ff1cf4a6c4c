"""One MoE-Tuning stage end to end: input model -> trained checkpoint dir + loss curve + JSON logs.

`out/` receives the final model in the official layout (config.json, model.safetensors, tokenizer files),
`checkpoint-N/` dirs (the same layout plus Trainer state, for --resume), `train_log.json` (every log
record), `stage.json` (what was trained, with which hyper-parameters, how long it took) and `loss.png`.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from runtime.errors import UserError

from ..loading import load_pretrained, load_tokenizer, special_token_ids
from ..model import MoELlavaForCausalLM
from .dataset import LlavaCollator, LlavaJsonDataset
from .distributed import Sharding, accumulation_steps, check_sharding, world_size
from .init import from_parts, is_llava_dir
from .plots import loss_curve
from .stages import STAGES, Group, LossNormaliser, Stage, StageSpec, apply_freezing, count_parameters
from .trainer import JsonLogCallback, MoETrainer
from .upcycle import moe_config, upcycle


@dataclass
class MoEOptions:
    """Stage III: how the dense model is upcycled (None = keep the value of the model's `moe` dict)."""
    num_experts: int | None = None
    top_k: int | None = None
    mode: str | None = None
    capacity_factor: float | None = None
    aux_loss_coef: float | None = None


@dataclass
class StageConfig:
    stage: Stage
    model: Path                       # MoE-LLaVA checkpoint dir (stage I: or a transformers LLM dir)
    data: Path                        # LLaVA-JSON
    out: Path
    image_folder: Path | None = None
    vision_tower: str | None = None   # stage I from an LLM dir: local CLIP/SigLIP dir
    learning_rate: float | None = None  # None = the stage's reference value
    epochs: float | None = None
    max_steps: int = -1
    batch_size: int = 16              # per device
    global_batch_size: int | None = None  # None = the stage's reference value; sets gradient accumulation
    warmup_ratio: float | None = None
    scheduler: str = "cosine"
    seed: int = 42
    model_max_length: int | None = None
    train_tower: bool = False         # unfreeze the vision tower too (off for real checkpoints)
    save_steps: int = 500
    save_total_limit: int | None = 1
    logging_steps: int = 1
    num_workers: int = 0
    precision: str = "fp32"           # fp32 | bf16 | fp16 (mixed precision, master weights fp32)
    resume: str | None = None         # a checkpoint-N dir, or "latest" (the newest under out/)
    cache_images: bool = False
    group_by_length: bool = False     # batches of similar length (less padding; LLaVA's group_by_modality_length)
    loss_normaliser: LossNormaliser = LossNormaliser.BATCH_MEAN
    sharding: Sharding = Sharding.DDP  # how processes split the work under torchrun / accelerate launch
    deepspeed: Path | None = None     # DeepSpeed JSON config (with sharding=deepspeed), e.g. configs/deepspeed/zero2.json
    moe: MoEOptions = field(default_factory=MoEOptions)
    progress: bool = True

    @property
    def spec(self) -> StageSpec:
        return STAGES[Stage(self.stage)]


def initial_model(cfg: StageConfig) -> MoELlavaForCausalLM:
    """The model a stage starts from (stage III: upcycled from the dense stage-II model)."""
    if cfg.stage is Stage.PRETRAIN and not is_llava_dir(cfg.model):
        if not cfg.vision_tower:
            raise UserError("stage 1 from a plain LLM dir needs --vision-tower DIR (a local CLIP/SigLIP)")
        return from_parts(cfg.model, cfg.vision_tower, cfg.model_max_length or 2048, cfg.seed)
    model = load_pretrained(cfg.model, cfg.vision_tower).model
    if model.config.moe.ep_size > 1:
        raise UserError(f"{cfg.model}: moe ep_size {model.config.moe.ep_size} asks for DeepSpeed expert parallelism, "
                        "which this trainer does not do (every process holds all experts); set ep_size 1 and shard "
                        "memory with --sharding deepspeed (ZeRO-2) or fsdp")
    if cfg.stage is not Stage.MOE and model.config.moe.enable:
        raise UserError(f"stage {int(cfg.stage)} trains a dense model but {cfg.model} has moe_enable: true")
    if cfg.stage is Stage.MOE and not model.config.moe.enable:
        o = cfg.moe
        model = upcycle(model, moe_config(model.config, o.num_experts, o.top_k, o.mode, None, o.capacity_factor,
                                          o.aux_loss_coef), seed=cfg.seed)
    if cfg.model_max_length:
        model.model_max_length = cfg.model_max_length
        model.config.backbone["tokenizer_model_max_length"] = cfg.model_max_length
    return model


def build_dataset(cfg: StageConfig, model: MoELlavaForCausalLM, tokenizer) -> LlavaJsonDataset:
    from ..image_processing import HFImageProcessor
    processor = HFImageProcessor(model.vision_tower.spec.processor, model.config.image_aspect_ratio)
    _, bos = special_token_ids(model.config, tokenizer)
    tower = model.vision_tower.spec.config
    tower = tower.get("vision_config", tower)  # a full CLIP / SigLIP config.json nests it
    patches = (int(tower["image_size"]) // int(tower["patch_size"])) ** 2  # visual tokens per image, near enough
    return LlavaJsonDataset(cfg.data, cfg.image_folder, tokenizer, processor, cfg.spec.template(model.config.model_type),
                            model.model_max_length, bos, cache_images=cfg.cache_images, image_tokens=patches)


def training_arguments(cfg: StageConfig, decoder_layer: str = ""):
    """The Trainer's arguments; `decoder_layer` names the FSDP wrap unit (the backbone's decoder-layer class)."""
    from transformers import TrainingArguments
    spec = cfg.spec
    global_batch = cfg.global_batch_size or spec.global_batch_size
    accumulation = accumulation_steps(global_batch, cfg.batch_size, world_size())
    return TrainingArguments(
        output_dir=str(cfg.out), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=cfg.learning_rate or spec.learning_rate,
        num_train_epochs=cfg.epochs or spec.epochs, max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_ratio if cfg.warmup_ratio is not None else spec.warmup_ratio,
        weight_decay=spec.weight_decay, lr_scheduler_type=cfg.scheduler, logging_steps=cfg.logging_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        seed=cfg.seed, data_seed=cfg.seed, dataloader_num_workers=cfg.num_workers,
        remove_unused_columns=False, report_to="none", disable_tqdm=not cfg.progress,
        bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16", max_grad_norm=1.0,
        dataloader_pin_memory=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        **sharding_arguments(cfg, decoder_layer))


def sharding_arguments(cfg: StageConfig, decoder_layer: str) -> dict:
    check_sharding(cfg.sharding, cfg.deepspeed, torch.cuda.is_available())
    if cfg.sharding is Sharding.FSDP:
        return dict(fsdp="full_shard auto_wrap", fsdp_config={"transformer_layer_cls_to_wrap": [decoder_layer]})
    if cfg.sharding is Sharding.DEEPSPEED:
        return dict(deepspeed=str(cfg.deepspeed))
    return {}


def loss_normaliser(cfg: StageConfig, dataset: LlavaJsonDataset) -> float | None:
    """Answer tokens per micro-batch on average (the Trainer's accumulation and DDP averaging do the rest)."""
    if LossNormaliser(cfg.loss_normaliser) is LossNormaliser.BATCH_MEAN:
        return None
    return cfg.batch_size * dataset.token_counts().mean_supervised


def resolve_resume(cfg: StageConfig) -> str | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint
        last = get_last_checkpoint(str(cfg.out)) if cfg.out.is_dir() else None
        if last is None:
            raise UserError(f"--resume: no checkpoint-N directory under {cfg.out}")
        return last
    if not (Path(cfg.resume) / "trainer_state.json").is_file():
        raise UserError(f"--resume {cfg.resume} is not a Trainer checkpoint (no trainer_state.json)")
    return str(cfg.resume)


def run_stage(cfg: StageConfig) -> Path:
    """Train one stage; returns `cfg.out`, a checkpoint dir loadable by load_pretrained."""
    cfg.out, start = Path(cfg.out), time.time()
    resume = resolve_resume(cfg)
    model = initial_model(cfg)
    tokenizer = load_tokenizer(Path(cfg.model))
    groups = cfg.spec.groups + ((Group.VISION_TOWER,) if cfg.train_tower else ())
    trainable = apply_freezing(model, groups)
    dataset = build_dataset(cfg, model, tokenizer)
    log = JsonLogCallback(cfg.out / "train_log.json")
    args = training_arguments(cfg, type(model.layers[0]).__name__)
    trainer = MoETrainer(model=model, args=args, train_dataset=dataset,
                         data_collator=LlavaCollator(special_token_ids(model.config, tokenizer)[0]),
                         callbacks=[log], tokenizer_dir=Path(cfg.model),
                         loss_normaliser=loss_normaliser(cfg, dataset))
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(cfg.out))
    if trainer.args.should_save:
        write_summary(cfg, trainer, model, trainable, time.time() - start, log.records)
    return cfg.out


def write_summary(cfg: StageConfig, trainer, model, trainable: list[str], seconds: float, records: list[dict]):
    spec, args = cfg.spec, trainer.args
    losses = [r for r in records if "loss" in r]
    summary = {
        "stage": int(spec.stage), "name": spec.name, "groups": [g.value for g in cfg.spec.groups]
        + (["vision_tower"] if cfg.train_tower else []), "init": str(cfg.model), "data": str(cfg.data),
        "moe_enable": model.config.moe.enable, "moe_layers": model.config.moe_layers,
        "parameters": count_parameters(model), "trainable_parameters": count_parameters(model, True),
        "trainable_tensors": len(trainable), "learning_rate": args.learning_rate,
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "steps": trainer.state.global_step, "epochs": trainer.state.epoch, "samples": len(trainer.train_dataset),
        "template": spec.template(model.config.model_type).value, "seconds": round(seconds, 1),
        "final": losses[-1] if losses else None, "config": {k: str(v) for k, v in asdict(cfg).items()},
    }
    (cfg.out / "stage.json").write_text(json.dumps(summary, indent=1) + "\n")
    loss_curve(records, cfg.out / "loss.png", f"stage {int(spec.stage)} ({spec.name})")
