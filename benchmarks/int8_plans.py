"""Which int8 weight-only plan keeps the answers: accuracy on a real model, speed on a bench preset.

    python benchmarks/int8_plans.py accuracy --model demo --fp32-export DIR [--plans b128,b32] [--json F]
    python benchmarks/int8_plans.py roles --model demo --fp32-export DIR [--json F]
    python benchmarks/int8_plans.py speed --fp32-export DIR [--plans b128,b32] [--rounds 15] [--out D] [--json F]

Each plan (PLANS below) quantises every part of the fp32 export (or each part its own way) with
calibration/weight_only.py; "shipped" is PLANS["int8"] there.

accuracy: against PyTorch fp32 on export.validate's validation samples (8 image + prompt pairs, 16 new
tokens - what validation.json counts):
  greedy        the plain greedy agreement of validation.json: free-running answers, compared up to the
                first divergence (one flip costs every token after it);
  flips         PyTorch's logit margin between its token and the export's at each first divergence;
  per-position  teacher-forced argmax agreement (PyTorch's answer fed back, each position judged alone), on
                the same samples and on --held-out more synthetic scenes;
  margin error  mean and 99th percentile of |change of the top-2 logit margin| over every teacher-forced
                position: how far the export moves a near-tie, whether or not one happens to flip.
roles: the same figures with ONE role quantised (8 bit, block 32 / 64 / 128), the rest fp32: the vision
tower, the projector, the embedding table (block 128: GatherBlockQuantized's 8-bit block, blockwise.block_for),
the decoder's dense MatMuls (attention projections and dense FFNs), its experts, the LM head.
speed: all exports' sessions open at once (1 thread); each round times a prefill of the bench prompt and
DECODE_STEPS decode steps of every export in turn; per round each export's time over fp32's; medians of
the ratios - on a shared machine a slow moment then hits the exports of one round alike.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration.weight_only import PLANS as SHIPPED, NBits, WeightOnlyPlan  # noqa: E402

PARTS = ("vision", "projector", "embed", "decoder")


def _plan(dense: int, head: int | None, experts: int) -> WeightOnlyPlan:
    return WeightOnlyPlan(dense=NBits(8, dense), head=head and NBits(8, head), expert_bits=8, embedding_bits=8,
                          expert_block=experts)


# name -> plan: dense MatMulNBits block, LM head block (None: float), QMoE experts block; v32-d64: the vision
# tower and projector at 32, the decoder's dense MatMuls at 64
PLANS = {"b128": _plan(128, 128, 128), "b64": _plan(64, 64, 64), "b32": _plan(32, 32, 32),
         "d32-h128-e64": _plan(32, 128, 64), "d32-h128-e128": _plan(32, 128, 128),
         "d128-h128-e32": _plan(128, 128, 32), "d64-h128-e64": _plan(64, 128, 64),
         "d32-h128-e32": _plan(32, 128, 32),
         "v32-d64-h128-e64": {"vision": _plan(32, 128, 64), "projector": _plan(32, 128, 64),
                              "embed": _plan(32, 128, 64), "decoder": _plan(64, 128, 64)},
         "b32-head-float": _plan(32, None, 32), "shipped": SHIPPED["int8"]}


NOTHING = WeightOnlyPlan(dense=None, head=None, expert_bits=None, embedding_bits=None)


def role_plans(block: int) -> dict[str, dict[str, WeightOnlyPlan]]:
    """{role: {part: plan}}: one role quantised at `block`, every other weight float."""
    spec = NBits(8, block)
    return {"vision tower": {"vision": replace(NOTHING, dense=spec, head=spec)},
            "projector": {"projector": replace(NOTHING, dense=spec, head=spec)},
            "embedding table": {"embed": replace(NOTHING, embedding_bits=8)},
            "decoder dense": {"decoder": replace(NOTHING, dense=spec)},
            "experts": {"decoder": replace(NOTHING, expert_bits=8, expert_block=block)},
            "LM head": {"decoder": replace(NOTHING, head=spec)}}


def quantised(fp32: Path, plan: WeightOnlyPlan | dict, out: Path) -> Path:
    """`plan` for every part, or {part: plan} with the parts not named float."""
    from calibration.quantize import quantize_export
    plans = {part: plan.get(part, NOTHING) for part in PARTS} if isinstance(plan, dict) \
        else {part: plan for part in PARTS}
    quantize_export(fp32, out, "int8", plans=plans)
    return out


def graph_mb(directory: Path) -> float:
    from calibration.report import graph_bytes
    return graph_bytes(directory) / 1e6


# ---- accuracy ------------------------------------------------------------------------------------
def reference(loaded, count: int) -> list[tuple]:
    """[(image, prompt, PyTorch greedy tokens, PyTorch teacher-forced logits)] for `count` samples."""
    from export.compare import PROMPTS, forced_logits
    from export.validate import sample_images
    from moe_llava.inference import pipeline_for
    pipe = pipeline_for(loaded)
    rows = []
    for k, image in enumerate(sample_images(loaded, count)):
        prompt = PROMPTS[k % len(PROMPTS)]
        tokens = pipe.generate(image, prompt, 16).token_ids
        rows.append((image, prompt, tokens, forced_logits(pipe, image, prompt, tokens)))
    return rows


def accuracy(directory: Path, samples: list[tuple], validation: int) -> dict:
    """The figures of the module docstring; samples[:validation] are validation.json's."""
    from export.compare import first_divergence, forced_logits
    from runtime.pipeline import load_pipeline
    matched = total = 0
    hits, counts, flips, margin_error = [0, 0], [0, 0], [], []
    with load_pipeline(directory) as runtime:
        for k, (image, prompt, want, ref) in enumerate(samples):
            held_out = int(k >= validation)
            if not held_out:
                got = runtime.generate(image, prompt, 16).token_ids
                step = first_divergence(want, got)
                matched += min(len(want), len(got)) if step is None else step
                total += max(len(want), len(got), 1)
                if step is not None:
                    flips.append(round(float(ref[step, want[step]] - ref[step, got[step]]), 3))
            ours = forced_logits(runtime, image, prompt, want)
            top, second = np.argsort(ref, -1)[:, -1], np.argsort(ref, -1)[:, -2]
            rows = np.arange(len(top))
            hits[held_out] += int((ours.argmax(-1) == top).sum())
            counts[held_out] += len(top)
            moved = (ours[rows, top] - ours[rows, second]) - (ref[rows, top] - ref[rows, second])
            margin_error += np.abs(moved).tolist()
    return {"greedy": matched / total, "flips": flips, "per_position": hits[0] / counts[0],
            "per_position_held_out": f"{hits[1]}/{counts[1]}", "margin_error_mean": float(np.mean(margin_error)),
            "margin_error_p99": float(np.quantile(margin_error, 0.99)), "size_mb": graph_mb(directory)}


def run_accuracy(args, names: list[str]) -> list[dict]:
    """Rows for the named plans (accuracy), or for each role x block (roles)."""
    from calibration.calibset import torch_threads_for
    from moe_llava.loading import load_pretrained
    loaded = load_pretrained(args.model)
    if args.mode == "roles":
        plans = {f"{role}, block {b}": chosen for b in (32, 64, 128) for role, chosen in role_plans(b).items()
                 if b == 128 or role != "embedding table"}
    else:
        plans = {name: PLANS[name] for name in names}
    rows = []
    print("| plan | greedy (plain) | flips at margin | per-position | held-out per-position | margin error mean / p99 "
          "| size MB |\n|---|---|---|---|---|---|---|")
    with torch_threads_for(loaded.model):
        samples = reference(loaded, 8 + args.held_out)
        for name, plan in plans.items():
            with tempfile.TemporaryDirectory() as tmp:
                row = {"plan": name, **accuracy(quantised(args.fp32_export, plan, Path(tmp) / "q"), samples, 8)}
            rows.append(row)
            print(accuracy_line(row), flush=True)
    return rows


def accuracy_line(row: dict) -> str:
    return (f"| {row['plan']} | {row['greedy']:.3f} | {', '.join(map(str, row['flips'])) or '-'} | "
            f"{row['per_position']:.3f} | {row['per_position_held_out']} | "
            f"{row['margin_error_mean']:.4f} / {row['margin_error_p99']:.3f} | {row['size_mb']:.2f} |")


# ---- speed ---------------------------------------------------------------------------------------
def one_round(pipeline, embeds, steps: int) -> tuple[float, float]:
    """(prefill s, decode s for `steps` greedy steps)."""
    start = time.perf_counter()
    token = int(np.argmax(pipeline.engine.prefill(embeds)))
    middle = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(pipeline.engine.decode(token)))
    return middle - start, time.perf_counter() - middle


def run_speed(args, names: list[str]) -> list[dict]:
    import contextlib

    from calibration.report import DECODE_STEPS, PROMPT, _scene
    from runtime.pipeline import load_pipeline
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        keep = Path(args.out or tmp)
        dirs = {"fp32": args.fp32_export}
        dirs.update({n: keep / n if (keep / n / "manifest.json").is_file() else
                     quantised(args.fp32_export, PLANS[n], keep / n) for n in names})
        pipes = {n: stack.enter_context(load_pipeline(d, threads=1)) for n, d in dirs.items()}
        embeds = {}
        for n, p in pipes.items():
            visual = p.engine.encode_images(p.preprocess(_scene())[None])[0]
            embeds[n] = p.prompt_embeds(p.prompt_ids(PROMPT, True), visual)
            one_round(p, embeds[n], 4)  # warm-up
        times = {n: [] for n in pipes}
        for r in range(args.rounds):
            order = list(pipes)[r % len(pipes):] + list(pipes)[:r % len(pipes)]
            for n in order:
                times[n].append(one_round(pipes[n], embeds[n], DECODE_STEPS))
        rows = []
        for n in pipes:
            t, base = np.array(times[n]), np.array(times["fp32"])
            rows.append({"plan": n, "size_mb": graph_mb(dirs[n]),
                         "decode_ms": 1000 * np.median(t[:, 1]) / DECODE_STEPS, "prefill_ms": 1000 * np.median(t[:, 0]),
                         "decode_speedup": float(np.median(base[:, 1] / t[:, 1])),
                         "prefill_ratio": float(np.median(t[:, 0] / base[:, 0]))})
    print("| plan | size MB | decode ms/token | decode speed-up vs fp32 | prefill ms | prefill / fp32 |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['plan']} | {r['size_mb']:.1f} | {r['decode_ms']:.2f} | {r['decode_speedup']:.2f}x | "
              f"{r['prefill_ms']:.1f} | {r['prefill_ratio']:.2f} |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["accuracy", "roles", "speed"])
    p.add_argument("--fp32-export", type=Path, required=True, help="fp32 ONNX export (moe-export --target onnx)")
    p.add_argument("--model", default="demo", help="accuracy: the checkpoint the export came from, or 'demo'")
    p.add_argument("--plans", default=",".join(PLANS), help=f"comma-separated, of: {', '.join(PLANS)}")
    p.add_argument("--held-out", type=int, default=32, help="accuracy: extra scenes, teacher-forced only")
    p.add_argument("--rounds", type=int, default=15, help="speed: interleaved rounds")
    p.add_argument("--out", help="speed: keep the quantised exports in OUT/<plan> (reused when there)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    names = args.plans.split(",")
    unknown = [n for n in names if n not in PLANS]
    if unknown:
        from runtime.errors import UserError
        raise UserError(f"--plans: unknown plan {', '.join(unknown)} (known: {', '.join(PLANS)})")
    rows = (run_speed if args.mode == "speed" else run_accuracy)(args, names)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    from runtime.errors import run_guarded
    sys.exit(run_guarded(main))  # a path that is not an export: one line, no traceback
