"""Target boards and GPUs for the memory plan (`moe-export --gpu BOARD --memory-plan`).

Sizes are GiB (2^30 bytes). A Jetson's GPU shares the board's RAM with the OS, so what a model may use is the
total less JETSON_RESERVE_GIB: the OS and its services (~0.8 GiB for a headless JetPack 6), the CUDA context
and the TensorRT/cuDNN/cuBLAS libraries the process maps (~0.7 GiB). A workstation GPU has its own memory;
DISCRETE_RESERVE_GIB is the CUDA context and the TensorRT kernels loaded into it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from runtime.errors import UserError

from .tensorrt_checks import FAMILIES

GIB = 1 << 30
JETSON_RESERVE_GIB = 1.5
DISCRETE_RESERVE_GIB = 0.5


@dataclass(frozen=True)
class Board:
    name: str
    memory_gib: float
    family: str | None  # GPU family of export/tensorrt_checks.py (None: a bare memory size)
    shared: bool  # Jetson: GPU memory is the system's RAM

    @property
    def reserve_gib(self) -> float:
        return JETSON_RESERVE_GIB if self.shared else DISCRETE_RESERVE_GIB

    @property
    def usable_bytes(self) -> int:
        return int((self.memory_gib - self.reserve_gib) * GIB)


BOARDS = {b.name: b for b in (
    Board("orin-nano-4gb", 4, "orin", True), Board("orin-nano-8gb", 8, "orin", True),
    Board("orin-nx-8gb", 8, "orin", True), Board("orin-nx-16gb", 16, "orin", True),
    Board("agx-orin-32gb", 32, "orin", True), Board("agx-orin-64gb", 64, "orin", True),
    Board("thor", 128, "thor", True),
    Board("rtx-3090", 24, "ampere", False), Board("a100-40gb", 40, "ampere", False),
    Board("a100-80gb", 80, "ampere", False), Board("rtx-a6000", 48, "ampere", False),
    Board("rtx-4090", 24, "ada", False), Board("l4", 24, "ada", False), Board("l40s", 48, "ada", False),
    Board("h100", 80, "hopper", False), Board("h200", 141, "hopper", False),
    Board("rtx-5090", 32, "blackwell", False),
)}
ALIASES = {"orin-nano": "orin-nano-8gb", "agx-thor": "thor"}  # the common configuration of each name
JETSONS = tuple(n for n, b in BOARDS.items() if b.shared)


def parse_board(value: str | None) -> Board | None:
    """--gpu: a board name, a memory size ("24GB", "24GiB": a discrete GPU of that size), or a GPU family /
    auto (None: no board, nothing to plan against)."""
    text = ALIASES.get((value or "auto").strip().lower(), (value or "auto").strip().lower())
    if text in BOARDS:  # before the families: "thor" is both, and the board implies the family
        return BOARDS[text]
    if text == "auto" or text in FAMILIES:
        return None
    size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*gi?b", text)
    if size:
        return Board(f"{size.group(1)} GiB GPU", float(size.group(1)), None, False)
    raise UserError(f"--gpu {value!r}: expected auto, a GPU family ({', '.join(FAMILIES)}), a board "
                    f"({', '.join(BOARDS)}) or a memory size such as 24GB")


def gpu_family(value: str | None) -> str:
    """The family --gpu names for the build's checks: a board's own, 'auto' for a bare memory size."""
    board = parse_board(value)
    if board is None:
        return value or "auto"
    return board.family or "auto"
