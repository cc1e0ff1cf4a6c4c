"""What `moe-run` prints, shared by --model (PyTorch) and --engine-dir (runtime): pieces as they come, then
with --json one JSON object as the LAST stdout line; without it a short timing line on stderr."""
from __future__ import annotations

import json
import sys

from runtime.generation import GenerationResult, Pipeline
from runtime.prompt import Turn
from runtime.settings import FinishReason, GenerationSettings


def result_json(result: GenerationResult) -> str:
    """One line (json.dumps without indent never emits a newline)."""
    return json.dumps({"text": result.text, "token_ids": result.token_ids, "timings": result.timings,
                       "prompt_tokens": result.prompt_tokens, "finish_reason": result.finish_reason.value})


def timing_line(result: GenerationResult) -> str:
    t = result.timings
    return (f"[{result.prompt_tokens} prompt tokens | ttft {t['ttft_ms']:.0f} ms | "
            f"{len(result.token_ids)} tokens, "
            f"{t['decode_tokens_per_s']:.1f} tok/s decode | total {t['total_ms']:.0f} ms]")


def context_end_warning(result: GenerationResult, settings: GenerationSettings) -> str | None:
    """The answer was cut by the model's context, not by max_new_tokens."""
    if result.finish_reason is FinishReason.LENGTH and len(result.token_ids) < settings.max_new_tokens:
        return (f"warning: the answer stopped after {len(result.token_ids)} tokens: prompt and answer filled the "
                f"model's context ({result.prompt_tokens + len(result.token_ids)} positions); "
                "use a shorter prompt for a longer answer")
    return None


def run_to_stdout(pipeline: Pipeline, image_path: str | None, prompt: str, settings: GenerationSettings,
                  as_json: bool) -> int:
    # The pipeline loads the path itself, so decoding the file counts in preprocess_ms.
    pieces = pipeline.chat_stream([Turn(prompt)], image_path or None, settings)
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
    warning = context_end_warning(result, settings)
    if warning:
        print(warning, file=sys.stderr)
    return 0
