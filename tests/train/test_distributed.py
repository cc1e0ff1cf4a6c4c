"""Data parallelism under torchrun on CPU (gloo): two processes must train exactly what one process trains with
the same global batch.

Why the weights can be compared exactly: one process with micro-batch 2 and gradient accumulation 2 sums
loss_a / 2 + loss_b / 2 over the same two micro-batches that two DDP processes see (the Trainer's seeded sampler
is sharded batch by batch), and DDP averages (g_a + g_b) / 2. Halving is exact in binary floating point and a
sum of two terms has one order, so the gradients - and every AdamW step after them - agree to the last bit;
the tolerance below only absorbs a BLAS that might split a reduction differently in another process.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_llava.checkpoint import read_state_dict
from moe_llava.train.distributed import Sharding, accumulation_steps, check_sharding
from runtime.errors import UserError
from tests.cli_helpers import run_cli

REPO = Path(__file__).resolve().parents[2]
RECORDS = 16  # a multiple of the global batch: no padded last step, 4 optimiser steps per epoch
GLOBAL_BATCH = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moe_train(tmp: Path, args: list[str], processes: int) -> subprocess.CompletedProcess:
    entry = tmp / "moe_train_entry.py"
    entry.write_text("import sys\nfrom cli import train_main\nsys.exit(train_main())\n")
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"] if processes > 1 else [sys.executable]
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launcher + [str(entry)] + args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def sixteen_records(tiny_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "instruct16.json"
    path.write_text(json.dumps(json.loads(tiny_data.instruct_json.read_text())[:RECORDS]))
    return path


def stage2_args(model: Path, data: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["--stage", "2", "--model", str(model), "--data", str(data), "--image-folder", str(images), "--out",
            str(out), "--batch-size", "2", "--global-batch-size", str(GLOBAL_BATCH), "--epochs", "1", "--lr", "1e-3",
            "--seed", "0", "--save-steps", "2", "--save-total-limit", "4", "--no-progress", *extra]


@pytest.fixture(scope="module")
def one_and_two(dense_dir, tiny_data, sixteen_records, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    single = moe_train(tmp, stage2_args(dense_dir, sixteen_records, tiny_data.root, tmp / "one"), 1)
    double = moe_train(tmp, stage2_args(dense_dir, sixteen_records, tiny_data.root, tmp / "two"), 2)
    return tmp, single, double


def assert_same_weights(a: Path, b: Path) -> None:
    want, got = read_state_dict(a), read_state_dict(b)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


def test_two_processes_train_what_one_process_trains(one_and_two, dense_dir):
    tmp, single, double = one_and_two
    for run in ("one", "two"):
        summary = json.loads((tmp / run / "stage.json").read_text())
        assert summary["steps"] == RECORDS // GLOBAL_BATCH and summary["epochs"] == 1.0, run
        assert summary["global_batch_size"] == GLOBAL_BATCH, run
    assert_same_weights(tmp / "one", tmp / "two")
    # ... and they did train: not the starting weights.
    assert not torch.equal(read_state_dict(tmp / "two")["lm_head.weight"], read_state_dict(dense_dir)["lm_head.weight"])


def test_only_the_first_process_logs_and_writes(one_and_two):
    tmp, _, double = one_and_two
    assert double.stdout.count("model written to") == 1
    log = [r for r in json.loads((tmp / "two" / "train_log.json").read_text()) if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    single = [r for r in json.loads((tmp / "one" / "train_log.json").read_text()) if "loss" in r]
    for a, b in zip(single, log):  # the loss parts are means over processes, like the Trainer's loss
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5)


def test_resume_under_torchrun_lands_on_the_same_weights(one_and_two, dense_dir, tiny_data, sixteen_records):
    tmp, _, _ = one_and_two
    out = tmp / "resumed"
    shutil.copytree(tmp / "two" / "checkpoint-2", out / "checkpoint-2")
    moe_train(tmp, stage2_args(dense_dir, sixteen_records, tiny_data.root, out, "--resume"), 2)
    assert [r["step"] for r in json.loads((out / "train_log.json").read_text()) if "loss" in r] == [1, 2, 3, 4]
    assert_same_weights(tmp / "two", out)


def test_global_batch_must_divide_evenly():
    assert accumulation_steps(128, 4, 2) == 16
    with pytest.raises(UserError, match="not a multiple of --batch-size 4 x 2"):
        accumulation_steps(12, 4, 2)


@pytest.mark.parametrize("sharding", [Sharding.FSDP, Sharding.DEEPSPEED])
def test_sharding_needs_cuda(sharding):
    with pytest.raises(UserError, match="needs CUDA"):
        check_sharding(sharding, None, cuda=False)
    check_sharding(Sharding.DDP, None, cuda=False)


def test_deepspeed_needs_its_config(tmp_path):
    with pytest.raises(UserError, match="--deepspeed CONFIG.json"):
        check_sharding(Sharding.DEEPSPEED, tmp_path / "missing.json", cuda=True)


def test_recipe_refuses_to_run_distributed(tmp_path, capsys, monkeypatch):
    from cli import train_main
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(train_main, ["--recipe", "demo", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--stage" in err


def test_shipped_deepspeed_config_is_zero2():
    config = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    assert config["zero_optimization"]["stage"] == 2
    assert config["train_batch_size"] == "auto"  # the Trainer fills batch sizes in from moe-train's flags
