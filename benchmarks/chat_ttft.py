"""Time to first token of a follow-up chat turn vs the first turn, through the Python API (issue 16's target:
turn 2 <= 0.3x turn 1 on the demo model).

    python benchmarks/chat_ttft.py --engine-dir /tmp/serve/demo-onnx [--conversations 20] [--threads 1]

Time to first token is timed as a one-token answer. Each conversation has its own image (the demo's example image, one pixel changed) (so turn 1 encodes it and prefills it; only the system prompt before the
image can come from the previous conversation's cache) and two turns; turn 2 resends the whole conversation,
image included, as an OpenAI client does. A third column runs turn 1 with prefix reuse off (a cold cache).
Conversations are interleaved, so load changes hit all columns alike; medians are reported, of wall-clock
time and of process CPU time (on a shared machine, wall clock also counts time the scheduler gave to others;
with --threads 1 the CPU time is the work itself).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.pipeline import load_pipeline  # noqa: E402
from runtime.prompt import Turn  # noqa: E402
from runtime.settings import GenerationSettings  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "moe_llava" / "assets" / "demo"
QUESTION, FOLLOW_UP = (DEMO / "example_prompt.txt").read_text().strip(), "What colour is the star?"


def conversation_image(i: int) -> Image.Image:
    """The demo's example image with pixel (0, 0) set from i: a new image (and digest) per conversation."""
    image = Image.open(DEMO / "example.png").convert("RGB")
    image.putpixel((0, 0), (i % 256, i // 256 % 256, 7))
    return image


def first_token(pipe, turns: list[Turn], image: Image.Image) -> tuple[float, float]:
    """(wall ms, CPU ms) of answering with one token: prompt handling, image, prefill, first token."""
    wall, cpu = time.perf_counter(), time.process_time()
    pipe.chat(turns, image, GenerationSettings(max_new_tokens=1))
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", required=True)
    p.add_argument("--conversations", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args(argv)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    rows: dict[str, list[tuple[float, float]]] = {"turn1_cold": [], "turn1": [], "turn2": []}
    with load_pipeline(args.engine_dir, threads=args.threads) as warm, \
            load_pipeline(args.engine_dir, threads=args.threads) as cold:
        cold.reuses_prefix = False
        for i in range(args.conversations + 1):  # the first is a warm-up
            image = conversation_image(i)
            cold_times = first_token(cold, [Turn(QUESTION)], image)
            first_times = first_token(warm, [Turn(QUESTION)], image)
            # the whole first answer (untimed; it reuses the prompt just prefilled), then the follow-up
            first = warm.chat([Turn(QUESTION)], image, settings)
            turns = [Turn("<image>\n" + QUESTION, first.text), Turn(FOLLOW_UP)]
            second_times = first_token(warm, turns, image)
            second = warm.last_result
            if i:
                for name, times in zip(rows, (cold_times, first_times, second_times)):
                    rows[name].append(times)
    report: dict = {"conversations": args.conversations,
                    "turn2_cached_of_prompt_tokens": [second.cached_tokens, second.prompt_tokens]}
    for clock, index in (("wall", 0), ("cpu", 1)):
        medians = {name: statistics.median(t[index] for t in times) for name, times in rows.items()}
        report |= {f"{name}_{clock}_ms": value for name, value in medians.items()}
        report[f"turn2_over_turn1_{clock}"] = medians["turn2"] / medians["turn1"]
        report[f"turn2_over_turn1_cold_{clock}"] = medians["turn2"] / medians["turn1_cold"]
    for key, value in report.items():
        print(f"{key:32s} {value:.3f}" if isinstance(value, float) else f"{key:32s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
