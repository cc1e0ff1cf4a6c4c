import json

import pytest

from cli import eval_main, train_main
from moe_llava.train import command, eval_command
from tests.cli_helpers import run_cli
from tests.tiny import write_tiny_checkpoint


@pytest.mark.parametrize("parser", [command.build_parser, eval_command.build_parser])
def test_help(parser, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["--help"])
    assert e.value.code == 0 and "--model" in capsys.readouterr().out


def test_recipe_threads_must_be_positive(tmp_path, capsys):
    code, _, err = run_cli(train_main, ["--recipe", "demo", "--out", str(tmp_path / "o"), "--threads", "0"], capsys)
    assert code == 2 and "--threads" in err and not (tmp_path / "o").exists()


def test_train_stage_needs_model_and_data(tmp_path, capsys):
    code, _, err = run_cli(train_main, ["--stage", "2", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--model" in err and "--data" in err


def test_train_stage_cli_runs_stage_3(dense_dir, tiny_data, tmp_path, capsys):
    argv = ["--stage", "3", "--model", str(dense_dir), "--data", str(tiny_data.instruct_json), "--image-folder",
            str(tiny_data.root), "--out", str(tmp_path / "s3"), "--max-steps", "1", "--batch-size", "2",
            "--num-experts", "2", "--top-k", "1", "--no-progress"]
    code, out, err = run_cli(train_main, argv, capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "s3" / "config.json").read_text())
    assert config["moe"]["moe_enable"] and config["moe"]["num_experts"] == [2, 2] and config["moe"]["top_k_experts"] == 1
    summary = json.loads((tmp_path / "s3" / "stage.json").read_text())
    assert summary["global_batch_size"] == 128 and summary["learning_rate"] == 2e-5  # reference defaults


def test_eval_cli_writes_json_and_plot(tiny_data, tmp_path, capsys):
    write_tiny_checkpoint(tmp_path / "m", moe=True)
    argv = ["--model", str(tmp_path / "m"), "--data", str(tiny_data.root), "--json", str(tmp_path / "r.json"),
            "--plot", str(tmp_path / "r.png"), "--limit", "4", "--no-progress"]
    code, out, err = run_cli(eval_main, argv, capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result) == {"pope", "open", "routing"} and "f1" in result["pope"]["adversarial"]
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert "adversarial" in out and "routing" in out


def test_eval_cli_rejects_a_non_dataset_dir(tmp_path, capsys):
    write_tiny_checkpoint(tmp_path / "m", moe=False)
    code, _, err = run_cli(eval_main, ["--model", str(tmp_path / "m"), "--data", str(tmp_path)], capsys)
    assert code == 2 and "pope_random.json" in err
