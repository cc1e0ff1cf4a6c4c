"""The memory plan as text or JSON, what would fit instead, and the checks a TensorRT build runs before it
starts (the model must fit the --gpu board; the MoE plugin's workspace must fit --workspace-mb)."""
from __future__ import annotations

import json
from dataclasses import replace

from moe_llava.config import MoELlavaConfig
from runtime.errors import UserError
from runtime.tensorrt.memory import moe_workspace_bytes

from .boards import GIB, Board
from .memory_plan import ModelShape, PlanRequest, WeightPrecision, plan_memory

SEQ_STEP = 256  # --max-seq suggestions are multiples of this
ROWS = (("KV cache", "kv_cache"), ("MoE plugin workspace", "moe_workspace"),
        ("TensorRT activations (estimate)", "activations"), ("runtime buffers", "runtime_buffers"))


def gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def render_text(plan: dict) -> str:
    group = f" (group {plan['group_size']})" if plan["group_size"] else ""
    lines = [f"memory plan: {plan['precision']}{group}, --max-seq {plan['max_seq']}, --max-batch "
             f"{plan['max_batch']}, on {plan['board']}"]
    for part, nbytes in plan["weights"].items():
        lines.append(f"  {part + ' weights':34} {gib(nbytes):>10}   {plan['params'][part] / 1e6:8.1f} M params")
    for label, key in ROWS:
        note = f"   {plan['kv_mode']}: {plan['kv_copies']} x [layers, 2, max_seq*kv_heads*head_dim]" \
            if key == "kv_cache" else ""
        lines.append(f"  {label:34} {gib(plan[key]):>10}{note}")
    lines.append(f"  {'total':34} {gib(plan['total']):>10}")
    reserve = f"{gib(plan['board_memory'])} less a {gib(plan['reserve'])} OS/CUDA reserve"
    verdict = f"fits, {gib(plan['usable'] - plan['total'])} spare" if plan["fits"] else \
        f"does NOT fit: {gib(plan['total'] - plan['usable'])} over"
    lines.append(f"  {'usable on ' + plan['board']:34} {gib(plan['usable']):>10}   ({reserve}): {verdict}")
    return "\n".join(lines)


def render_json(plan: dict) -> str:
    return json.dumps(plan, indent=2)


def what_fits(cfg: MoELlavaConfig, request: PlanRequest) -> list[str]:
    """Changes that make the plan fit: a smaller weight precision, then the longest --max-seq that fits."""
    options = []
    for precision in (WeightPrecision.INT8, WeightPrecision.INT4):
        if _smaller(precision, request.precision):
            plan = plan_memory(cfg, replace(request, precision=precision))
            if plan["fits"]:
                options.append(f"--precision {precision.value} ({gib(plan['total'])})")
    seq = _longest_fitting_seq(cfg, request)
    if seq:
        options.append(f"--max-seq {seq} ({gib(plan_memory(cfg, replace(request, max_seq=seq))['total'])})")
    return options


def _smaller(a: WeightPrecision, b: WeightPrecision) -> bool:
    order = [WeightPrecision.INT4, WeightPrecision.INT8, WeightPrecision.FP16, WeightPrecision.FP32]
    return order.index(a) < order.index(b)


def _longest_fitting_seq(cfg: MoELlavaConfig, request: PlanRequest) -> int | None:
    best = None
    for seq in range(SEQ_STEP, request.max_seq, SEQ_STEP):
        if not plan_memory(cfg, replace(request, max_seq=seq))["fits"]:
            break
        best = seq
    return best


def check_fits(cfg: MoELlavaConfig, request: PlanRequest) -> dict:
    """The plan, or a one-line UserError saying by how much it misses and what would fit."""
    plan = plan_memory(cfg, request)
    if plan["fits"]:
        return plan
    options = what_fits(cfg, request) or ["a board with more memory"]
    raise UserError(f"{request.precision.value} at --max-seq {request.max_seq} needs {gib(plan['total'])} but "
                    f"{request.board.name} has {gib(plan['usable'])} usable ({gib(plan['total'] - plan['usable'])} "
                    f"over); would fit: {' or '.join(options)} (moe-export --memory-plan shows every part)")


def check_plugin_workspace(cfg: MoELlavaConfig, precision: WeightPrecision, tokens: int, workspace_mb: int) -> None:
    """TensorRT's workspace pool limit bounds every layer's scratch, the plugin's included: the plugin asks for
    moe_workspace_bytes at the prefill profile's max tokens (max_batch x max_seq), as its getWorkspaceSize does."""
    shape = ModelShape.from_config(cfg)
    if not shape.moe_layers:
        return
    size = moe_workspace_bytes(tokens, max(shape.experts), shape.top_k, shape.hidden, shape.ffn,
                               precision.activation_itemsize)
    if size <= workspace_mb << 20:
        return
    per_token = size / tokens
    fit_tokens = int((workspace_mb << 20) / per_token) // SEQ_STEP * SEQ_STEP
    shorter = f" or --max-seq {fit_tokens} x --max-batch 1" if fit_tokens else ""
    raise UserError(f"the MoE plugin needs {-(-size // (1 << 20))} MiB of workspace for {tokens} tokens "
                    f"(--max-seq x --max-batch) but --workspace-mb is {workspace_mb}; use --workspace-mb "
                    f"{-(-size // (1 << 20))}{shorter}")


def board_request(precision: str, board: Board, max_seq: int, max_batch: int, group_size: int) -> PlanRequest:
    fp8_as_int8 = "int8" if precision == "fp8" else precision  # one byte per weight either way
    try:
        weights = WeightPrecision(fp8_as_int8)
    except ValueError:
        raise UserError(f"--precision {precision}: the memory plan knows fp32, fp16, int8, fp8 and int4") from None
    if group_size not in (64, 128):
        raise UserError(f"--group-size {group_size}: int4 groups are 64 or 128 inputs")
    return PlanRequest(weights, board, max_seq, max_batch, group_size)


def build_config(model, source_config: dict | None) -> MoELlavaConfig | None:
    """The config a TensorRT build is for: the ONNX export's manifest, or --model DIR's config.json (None for
    the embedded demo model, which is tiny)."""
    from pathlib import Path
    if source_config is not None:
        return MoELlavaConfig.from_dict(source_config)
    if model and model != "demo" and (Path(model) / "config.json").is_file():
        return MoELlavaConfig.from_json(Path(model) / "config.json")
    return None


def check_build_memory(cfg: MoELlavaConfig | None, board: Board | None, precision: str, max_seq: int,
                       max_batch: int, group_size: int, plugin: bool, workspace_mb: int | None) -> None:
    """Before a TensorRT build: the model fits --gpu BOARD, and the plugin's workspace fits --workspace-mb."""
    if cfg is None:
        return
    request = board_request(precision, board or Board("any", 0, None, False), max_seq, max_batch, group_size)
    if board is not None:
        check_fits(cfg, request)
    if plugin and workspace_mb:
        check_plugin_workspace(cfg, request.precision, max_seq * max_batch, workspace_mb)
