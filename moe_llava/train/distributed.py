"""Data parallelism under torchrun / accelerate launch: which process this is, and the batch arithmetic.

The launchers describe the job in environment variables (WORLD_SIZE, RANK); the HF Trainer then wraps the
model in DDP, shards each batch across processes and averages gradients. On a machine without CUDA the
Trainer must be told to use the CPU explicitly, or it leaves the gloo process group unused and every process
trains alone on the same data (transformers' "parallel_mode != DISTRIBUTED" warning).
"""
from __future__ import annotations

import importlib.util
import os
from enum import Enum
from pathlib import Path

from runtime.errors import UserError


class Sharding(str, Enum):
    DDP = "ddp"              # every process holds the whole model; gradients all-reduced (torch DDP)
    FSDP = "fsdp"            # parameters, gradients and optimiser state sharded per decoder layer (torch FSDP)
    DEEPSPEED = "deepspeed"  # DeepSpeed with a JSON config (the reference's recipe: ZeRO-2)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def leave_process_group() -> None:
    """Close the launcher's process group (the Trainer opened it) before the process exits: left to interpreter
    teardown, gloo's threads once aborted a rank after its training had finished (std::terminate, exit -6)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def accumulation_steps(global_batch: int, per_device_batch: int, world: int) -> int:
    """Gradient accumulation that makes each optimiser step consume exactly `global_batch` samples."""
    per_step = per_device_batch * world
    if global_batch % per_step:
        raise UserError(f"--global-batch-size {global_batch} is not a multiple of --batch-size {per_device_batch} "
                        f"x {world} process(es) = {per_step}: choose a global batch of k x {per_step}, or change "
                        "--batch-size")
    return global_batch // per_step


def check_sharding(sharding: Sharding, deepspeed_config: Path | None, cuda: bool) -> None:
    """Refuse what would not do what it says. accelerate runs FSDP only on accelerators (on CPU the Trainer
    quietly falls back to DDP), and DeepSpeed's CPU path did not start under gloo here."""
    if sharding is Sharding.DDP:
        return
    if not cuda:
        raise UserError(f"--sharding {sharding.value} needs CUDA GPUs (on CPU, accelerate and DeepSpeed do not "
                        "shard); use --sharding ddp on CPU")
    if sharding is Sharding.DEEPSPEED:
        if deepspeed_config is None or not Path(deepspeed_config).is_file():
            raise UserError(f"--sharding deepspeed needs --deepspeed CONFIG.json (got {deepspeed_config}); "
                            "e.g. configs/deepspeed/zero2.json")
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError("--sharding deepspeed: DeepSpeed is not installed (pip install deepspeed on the GPU "
                            "machine)")
