"""MoE scaling study and synthetic checkpoints for moe-bench (a thin wrapper over benchmarks/command.py).

    python benchmarks/moe_scaling.py --experts 4,8,16 [--preset small] [--runs 3] [--json F] [--plot F]
        decode ms/token and prefill ms of PyTorch eager and onnxruntime for random StableLM-shaped models with
        E experts at k=2 and equal active size (same as `moe-bench --scale-experts 4,8,16`)
    python benchmarks/moe_scaling.py --write-checkpoint DIR [--preset 300m] [--experts 4]
        write one such checkpoint, e.g. the ~300M config for `moe-bench --model DIR` (roofline check)
    python benchmarks/moe_scaling.py --write-checkpoint DIR --preset stablelm-1.6b-4e|phi2-2.7b-4e|qwen-1.8b-4e|...
        a random-weight checkpoint of exactly a released shape (config, tower embedded, fp16 shards + index),
        written tensor by tensor (moe_llava/random_checkpoint.py); --seed picks the weights
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.synthetic import Preset  # noqa: E402
from moe_llava.released import ReleasedPreset  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", default="4,8,16", help="comma-separated expert counts (k=2)")
    p.add_argument("--preset", choices=[x.value for x in (*Preset, *ReleasedPreset)], default=Preset.SMALL.value,
                   help="a timing shape, or a released model's shape (only with --write-checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="weights of --write-checkpoint")
    p.add_argument("--write-checkpoint", metavar="DIR", help="only write a checkpoint (first --experts value)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backends", default="pytorch,onnxruntime")
    p.add_argument("--scale-dir", help="keep checkpoints and exports here and reuse them")
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    experts = [int(e) for e in args.experts.split(",")]
    if args.write_checkpoint and args.preset in {x.value for x in ReleasedPreset}:
        print(write_released_checkpoint(args.write_checkpoint, args.preset, args.seed))
        return 0
    if args.write_checkpoint:
        from benchmarks.synthetic import write_synthetic_checkpoint
        print(write_synthetic_checkpoint(args.write_checkpoint, args.preset, experts[0]))
        return 0
    if args.preset in {x.value for x in ReleasedPreset}:
        p.error("a released preset only goes with --write-checkpoint")
    from benchmarks.command import build_parser, main as bench
    from runtime.errors import run_command
    forwarded = ["--scale-experts", args.experts, "--scale-preset", args.preset, "--runs", str(args.runs),
                 "--warmup", str(args.warmup), "--max-new-tokens", str(args.max_new_tokens),
                 "--backends", args.backends]
    for flag, value in (("--threads", args.threads), ("--json", args.json), ("--plot", args.plot),
                        ("--scale-dir", args.scale_dir)):
        if value is not None:
            forwarded += [flag, str(value)]
    return run_command(bench, build_parser(), forwarded)


def write_released_checkpoint(directory: str, preset: str, seed: int) -> Path:
    """Random fp16 weights of a released shape + a small BPE tokenizer (ids < 512) for prompts."""
    from benchmarks.synthetic import write_tokenizer
    from moe_llava.random_checkpoint import write_random_checkpoint
    from moe_llava.released import released_config
    out = write_random_checkpoint(directory, released_config(preset), seed)
    write_tokenizer(out, 512)
    return out


if __name__ == "__main__":
    sys.exit(main())
