import json
import shutil

import pytest
import torch

from moe_llava.checkpoint import read_state_dict
from moe_llava.loading import load_pretrained
from moe_llava.train.run import StageConfig, run_stage
from moe_llava.train.stages import Stage
from runtime.errors import UserError


def _config(stage, model, data, out, **kw):
    json_path = data.captions_json if stage is Stage.PRETRAIN else data.instruct_json
    defaults = dict(image_folder=data.root, max_steps=2, batch_size=4, global_batch_size=4, learning_rate=1e-3,
                    save_steps=1, save_total_limit=None, progress=False, seed=0)
    return StageConfig(stage=stage, model=model, data=json_path, out=out, **(defaults | kw))


@pytest.fixture(scope="module")
def stage2(dense_dir, tiny_data, tmp_path_factory):
    return run_stage(_config(Stage.FINETUNE, dense_dir, tiny_data, tmp_path_factory.mktemp("s2")))


def test_stage2_smoke_writes_an_official_checkpoint(stage2, dense_dir):
    loaded = load_pretrained(stage2)
    assert not loaded.config.moe.enable
    assert (stage2 / "tokenizer.json").is_file() and (stage2 / "loss.png").stat().st_size > 1000
    log = json.loads((stage2 / "train_log.json").read_text())
    assert [r["step"] for r in log if "loss" in r] == [1, 2] and all("lm_loss" in r for r in log if "loss" in r)
    summary = json.loads((stage2 / "stage.json").read_text())
    assert summary["steps"] == 2 and summary["groups"] == ["projector", "language_model"]
    before, after = read_state_dict(dense_dir), read_state_dict(stage2)
    tower = [k for k in after if k.startswith("model.image_tower.")]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)  # frozen
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    # Intermediate checkpoints are official checkpoints too.
    assert not load_pretrained(stage2 / "checkpoint-1").config.moe.enable


def test_stage3_upcycles_and_logs_aux_loss(stage2, tiny_data, tmp_path):
    out = run_stage(_config(Stage.MOE, stage2, tiny_data, tmp_path / "s3", save_steps=100))
    loaded = load_pretrained(out)
    assert loaded.config.moe.enable and loaded.config.moe_layers == [0, 2]
    assert loaded.config.moe.train_modules == ["deepspeed_moe"]
    state = read_state_dict(out)
    assert "model.layers.0.mlp.deepspeed_moe.gate.wg.weight" in state
    log = [r for r in json.loads((out / "train_log.json").read_text()) if "loss" in r]
    assert all(r["aux_loss"] > 0 for r in log)
    dense = read_state_dict(stage2)
    # Only MoE layers train: attention, embeddings, dense FFNs keep their stage-II values.
    for key in ("model.layers.1.mlp.gate_proj.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        assert torch.equal(state[key], dense[key]), key
    e0 = "model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.0.gate_proj.weight"
    assert not torch.equal(state[e0], dense["model.layers.0.mlp.gate_proj.weight"])


def test_resume_continues_where_the_checkpoint_stopped(dense_dir, tiny_data, stage2, tmp_path):
    # stage2 ran 2 steps straight, keeping checkpoint-1; resuming from checkpoint-1 must land on the same weights.
    out = tmp_path / "resumed"
    shutil.copytree(stage2 / "checkpoint-1", out / "checkpoint-1")
    run_stage(_config(Stage.FINETUNE, dense_dir, tiny_data, out, resume="latest"))
    log = [r["step"] for r in json.loads((out / "train_log.json").read_text()) if "loss" in r]
    assert log == [1, 2]
    want, got = read_state_dict(stage2), read_state_dict(out)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5)


def test_stage_inputs_are_checked(stage2, tiny_data, tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        run_stage(_config(Stage.FINETUNE, stage2, tiny_data, tmp_path / "x", resume="latest"))
    moe_dir = tmp_path / "moe"
    from tests.tiny import write_tiny_checkpoint
    write_tiny_checkpoint(moe_dir, moe=True)
    with pytest.raises(UserError, match="dense"):
        run_stage(_config(Stage.FINETUNE, moe_dir, tiny_data, tmp_path / "y"))
