"""Running the console entry points in-process, as a user would from a shell."""
import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def run_cli(main, argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])
