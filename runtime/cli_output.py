"""What `moe-run` prints, shared by --model (PyTorch) and --engine-dir (runtime): pieces as they come, then
with --json one JSON object as the LAST stdout line; without it a short timing line on stderr."""
from __future__ import annotations

import json
import sys

from runtime.generation import GenerationResult, Pipeline


def result_json(result: GenerationResult) -> str:
    """One line (json.dumps without indent never emits a newline)."""
    return json.dumps({"text": result.text, "token_ids": result.token_ids, "timings": result.timings,
                       "prompt_tokens": result.prompt_tokens})


def timing_line(result: GenerationResult) -> str:
    t = result.timings
    return (f"[{result.prompt_tokens} prompt tokens | ttft {t['ttft_ms']:.0f} ms | "
            f"{len(result.token_ids)} tokens, "
            f"{t['decode_tokens_per_s']:.1f} tok/s decode | total {t['total_ms']:.0f} ms]")


def run_to_stdout(pipeline: Pipeline, image_path: str | None, prompt: str, max_new_tokens: int,
                  temperature: float, top_p: float, seed: int, as_json: bool) -> int:
    # The pipeline loads the path itself, so decoding the file counts in preprocess_ms.
    pieces = pipeline.stream(image_path or None, prompt, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, seed=seed)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    result = pipeline.last_result
    sys.stdout.write("\n")
    if as_json:
        sys.stdout.write(result_json(result) + "\n")
    else:
        print(timing_line(result), file=sys.stderr)
    sys.stdout.flush()
    return 0
