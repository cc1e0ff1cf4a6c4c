"""`moe-train`: argument parsing and one call into run.py / recipes.py."""
from __future__ import annotations

import argparse
from pathlib import Path

from runtime.errors import UserError

from .distributed import Sharding
from .stages import STAGES, LossNormaliser, Stage

RECIPES = ("demo",)


# ---- moe-train -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-train", description="MoE-Tuning: stage 1 (projector), 2 (LLM + projector), 3 (MoE layers, "
        "upcycled from stage 2) on the HF Trainer; or the whole demo recipe. --stage is data-parallel under "
        "torchrun / accelerate launch (CPU: gloo, GPU: nccl; --sharding fsdp, or deepspeed with "
        "configs/deepspeed/zero2.json, on GPUs): each process takes its shard, --global-batch-size is what one optimiser step "
        "consumes, only the first process logs and writes. Defaults are the reference hyper-parameters of each "
        "stage.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--recipe", choices=RECIPES, help="run a whole recipe (synthetic data, all stages)")
    what.add_argument("--stage", type=int, choices=[int(s) for s in Stage], help="run one stage")
    p.add_argument("--out", required=True, type=Path, help="output dir (stage: checkpoints + final model; "
                   "recipe: the final model, e.g. moe_llava/assets/demo)")
    stage = p.add_argument_group("one stage (--stage)")
    stage.add_argument("--model", type=Path, help="input MoE-LLaVA checkpoint dir (stage 1: or a transformers "
                       "StableLM/Phi dir together with --vision-tower); stage 3 upcycles a dense stage-2 model")
    stage.add_argument("--data", type=Path, help="LLaVA-JSON file")
    stage.add_argument("--image-folder", type=Path, help="root of the JSON's relative image paths")
    stage.add_argument("--vision-tower", help="local CLIP/SigLIP dir (stage 1 from an LLM dir, or an override)")
    stage.add_argument("--lr", type=float, help="learning rate (default: 1e-3 / 2e-5 / 2e-5 for stage 1/2/3)")
    stage.add_argument("--epochs", type=float, help="epochs (default 1)")
    stage.add_argument("--max-steps", type=int, default=-1, help="stop after N optimiser steps (-1: epochs)")
    stage.add_argument("--batch-size", type=int, default=16, help="per-device micro-batch")
    stage.add_argument("--global-batch-size", type=int, help="samples per optimiser step over all processes; a multiple of --batch-size x processes, it sets "
                       "gradient accumulation (default: 256 / 128 / 128)")
    stage.add_argument("--warmup-ratio", type=float, help="default 0.03")
    stage.add_argument("--model-max-length", type=int, help="token limit (default: the config's, else 2048)")
    stage.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="mixed precision")
    stage.add_argument("--train-tower", action="store_true", help="also train the vision tower (off in the "
                       "reference; frozen is right for pretrained CLIP/SigLIP towers)")
    stage.add_argument("--save-steps", type=int, default=500, help="write checkpoint-N every N steps")
    stage.add_argument("--save-total-limit", type=int, default=1, help="checkpoint-N dirs to keep")
    stage.add_argument("--resume", nargs="?", const="latest", help="resume from a checkpoint-N dir "
                       "(no value: the newest under --out)")
    stage.add_argument("--num-workers", type=int, default=0, help="data loader processes")
    stage.add_argument("--logging-steps", type=int, default=1)
    stage.add_argument("--cache-images", action="store_true", help="keep preprocessed images in memory")
    stage.add_argument("--group-by-length", action="store_true", help="batch samples of similar length together "
                       "(less padding); use it with --loss-normaliser constant, else a batch of short answers "
                       "weighs each of its tokens more")
    stage.add_argument("--loss-normaliser", choices=[n.value for n in LossNormaliser],
                       default=LossNormaliser.BATCH_MEAN.value, help="divide a batch's summed LM loss by its own "
                       "answer-token count (batch-mean, the reference) or by the data set's mean per batch (constant)")
    stage.add_argument("--sharding", choices=[m.value for m in Sharding], default=Sharding.DDP.value,
                       help="how processes share the work under torchrun / accelerate launch: ddp (whole model per "
                       "process), fsdp (sharded per decoder layer), deepspeed (with --deepspeed)")
    stage.add_argument("--deepspeed", type=Path, help="DeepSpeed JSON config for --sharding deepspeed "
                       "(configs/deepspeed/zero2.json: the reference's ZeRO-2)")
    moe = p.add_argument_group("stage 3 upcycling (default: the model's moe dict)")
    moe.add_argument("--num-experts", type=int)
    moe.add_argument("--top-k", type=int)
    moe.add_argument("--moe-mode", choices=["sparse", "first_half", "second_half", "dense"])
    moe.add_argument("--capacity-factor", type=float)
    moe.add_argument("--aux-loss-coef", type=float, help="router_aux_loss_coef (0.01)")
    p.add_argument("--seed", type=int, default=42, help="stage seed (the demo recipe uses its own fixed seeds)")
    p.add_argument("--work-dir", type=Path, default=Path("build/demo"),
                   help="recipe: data, tokenizer and every stage's checkpoint")
    p.add_argument("--ablation", action="store_true", help="recipe: also run the RQ2 ablation (stage 3 right "
                   "after stage 1, without stage 2) and evaluate it; an analysis, not needed for the model (+3 min)")
    p.add_argument("--threads", type=int, default=1, help="recipe: torch threads (1: the demo model is too small "
                   "for a second thread to pay, and threads stall when another job shares the cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(args: argparse.Namespace) -> int:
    from .distributed import is_main_process, leave_process_group, world_size
    if args.recipe:
        if world_size() > 1:
            raise UserError("--recipe runs in one process (it generates its data and tokenizer first); under "
                            "torchrun / accelerate launch run its stages one by one with --stage")
        if args.threads < 1:
            raise UserError("--threads must be at least 1")
        from .recipes import run_demo
        run_demo(args.out, args.work_dir, ablation=args.ablation, progress=not args.no_progress, threads=args.threads)
        print(f"demo model written to {args.out}")
        return 0
    from .run import run_stage
    path = run_stage(stage_config(args))
    leave_process_group()
    if is_main_process():
        print(f"stage {args.stage} ({STAGES[Stage(args.stage)].name}) model written to {path}")
    return 0


def stage_config(args: argparse.Namespace):
    from .run import MoEOptions, StageConfig
    missing = [flag for flag, value in (("--model", args.model), ("--data", args.data)) if value is None]
    if missing:
        raise UserError(f"--stage needs {' and '.join(missing)}")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    return StageConfig(
        stage=Stage(args.stage), model=args.model, data=args.data, out=args.out, image_folder=args.image_folder,
        vision_tower=args.vision_tower, learning_rate=args.lr, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, global_batch_size=args.global_batch_size, warmup_ratio=args.warmup_ratio,
        seed=args.seed, model_max_length=args.model_max_length, train_tower=args.train_tower,
        save_steps=args.save_steps, save_total_limit=args.save_total_limit, logging_steps=args.logging_steps,
        num_workers=args.num_workers, precision=args.precision, resume=args.resume, cache_images=args.cache_images,
        group_by_length=args.group_by_length, loss_normaliser=LossNormaliser(args.loss_normaliser), sharding=Sharding(args.sharding), deepspeed=args.deepspeed,
        progress=not args.no_progress,
        moe=MoEOptions(args.num_experts, args.top_k, args.moe_mode, args.capacity_factor, args.aux_loss_coef))
