"""`moe-export --memory-plan`: the plan for a checkpoint's config.json, as text or JSON."""
from __future__ import annotations

from runtime.errors import UserError

from .boards import parse_board
from .memory_plan import load_config, plan_memory
from .memory_report import board_request, render_json, render_text, what_fits


def print_memory_plan(model: str | None, precision: str, gpu: str, max_seq: int, max_batch: int, group_size: int,
                      as_json: bool) -> int:
    if not model or model == "demo":
        raise UserError("--memory-plan needs --model DIR (a checkpoint directory with config.json)")
    board = parse_board(gpu)
    if board is None:
        raise UserError(f"--memory-plan needs --gpu BOARD (e.g. orin-nano-8gb, agx-orin-64gb, rtx-4090) or a "
                        f"memory size such as 24GB, not {gpu!r}")
    if max_seq < 2 or max_batch < 1:
        raise UserError("--max-seq must be at least 2 and --max-batch at least 1")
    cfg, request = load_config(model), board_request(precision, board, max_seq, max_batch, group_size)
    plan = plan_memory(cfg, request)
    if not plan["fits"]:
        plan["would_fit"] = what_fits(cfg, request)
    print(render_json(plan) if as_json else render_text(plan))
    if not as_json and not plan["fits"]:
        print(f"  would fit: {' or '.join(plan['would_fit']) or 'a board with more memory'}")
    return 0
