"""`moe-eval`: argument parsing and one call into evaluate.py."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from runtime.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-eval", description="Evaluate a model on the held-out synthetic scenes with greedy decoding: "
        "POPE (random / popular / adversarial: accuracy, precision, recall, F1, yes-ratio), open-question "
        "accuracy, and expert routing per MoE layer split by image / text tokens.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint dir or 'demo'")
    p.add_argument("--data", type=Path, help="synthetic dataset dir (default: regenerate the demo recipe's)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--plot", type=Path, help="write the expert-loading figure (PNG) here")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="at most N questions per set (quick checks)")
    p.add_argument("--vision-tower", help="local CLIP/SigLIP dir overriding the config's mm_image_tower")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(args: argparse.Namespace) -> int:
    from ..loading import load_pretrained
    from .evaluate import evaluate, format_report, write_json
    from .plots import expert_loading
    if args.data is not None and not (args.data / "pope_random.json").is_file():
        raise UserError(f"--data {args.data} is not a synthetic dataset dir (no pope_random.json); "
                        "omit --data to regenerate the demo's held-out set")
    loaded = load_pretrained(args.model, args.vision_tower)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or demo_heldout(Path(tmp))
        result = evaluate(loaded, data, args.batch_size, args.limit, progress=not args.no_progress)
    print(format_report(result))
    if args.json:
        write_json(result, args.json)
    if args.plot:
        if expert_loading(result["routing"], args.plot, f"expert loading: {args.model}") is None:
            print("no expert-loading figure: the model has no MoE layers")
    return 0


def demo_heldout(directory: Path) -> Path:
    """The demo recipe's dataset (the same held-out scenes and POPE negatives), regenerated."""
    from ..data import generate_dataset
    from .recipes import DEMO
    return generate_dataset(directory, DEMO.n_train, DEMO.n_heldout, DEMO.seed).root
