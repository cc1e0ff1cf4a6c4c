"""Which part of a model loses greedy agreement when quantised: one part / decoder layer at a time.

    python benchmarks/quant_sensitivity.py --model demo --fp32-export DIR --precision int4 [--json F]

Each row quantises ONE thing with the precision's weight-only plan (calibration/weight_only.py) and leaves
everything else fp32: the vision tower, the projector, the embedding table, each decoder layer (its
attention / dense FFN MatMuls and its experts), the LM head; then the whole plan. Greedy agreement (plain,
as validation.json counts it), logit cosine and the divergences' PyTorch logit margins against PyTorch fp32,
on export.validate's validation samples. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NOTHING = dict(dense=None, head=None, expert_bits=None, embedding_bits=None)


def variants(plan, layers: int) -> dict[str, dict]:
    """{row label: {part: plan}}; parts not named are re-saved float (a plan that quantises nothing)."""
    none = replace(plan, **NOTHING)
    rows = {"vision tower": {"vision": plan}, "projector": {"projector": plan},
            "embedding table": {"embed": plan}}
    for i in range(layers):
        rows[f"decoder layer {i}"] = {"decoder": replace(none, dense=plan.dense, expert_bits=plan.expert_bits,
                                                         layers=frozenset({i}))}
    rows["LM head"] = {"decoder": replace(none, head=plan.head)}
    rows["everything (the plan)"] = {}
    return {label: {part: chosen.get(part, none) for part in ("vision", "projector", "embed", "decoder")}
            if chosen else {} for label, chosen in rows.items()}


def measure(loaded, directory: Path, samples: int, new_tokens: int) -> dict:
    from calibration.validation import logit_cosine
    from export.validate import greedy_agreement, sample_images
    images = sample_images(loaded, samples)
    greedy, answers = greedy_agreement(loaded, directory, images, new_tokens)
    cosine, divergences = logit_cosine(loaded, directory, images, answers)
    return {"greedy_agreement": greedy, "logit_cosine": cosine["mean"],
            "margins": sorted(round(d["reference_margin"], 3) for d in divergences)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory or 'demo'")
    p.add_argument("--fp32-export", required=True, help="fp32 ONNX export of --model (moe-export --target onnx)")
    p.add_argument("--precision", choices=["int8", "int4"], default="int4")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    from calibration.calibset import torch_threads_for
    from calibration.quantize import quantize_export
    from calibration.weight_only import PLANS
    from moe_llava.loading import load_pretrained
    loaded = load_pretrained(args.model)
    rows = []
    print("| quantised | greedy agreement | logit cosine | divergence margins (logits) |\n|---|---|---|---|")
    for label, plans in variants(PLANS[args.precision], loaded.config.num_layers).items():
        with tempfile.TemporaryDirectory() as tmp, torch_threads_for(loaded.model):
            quantize_export(Path(args.fp32_export), Path(tmp) / "q", args.precision, plans=plans or None)
            row = {"quantised": label, **measure(loaded, Path(tmp) / "q", args.samples, args.max_new_tokens)}
        rows.append(row)
        print(f"| {label} | {row['greedy_agreement']:.3f} | {row['logit_cosine']:.6f} | "
              f"{', '.join(map(str, row['margins'])) or '-'} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    from runtime.errors import run_guarded
    sys.exit(run_guarded(main))  # a path that is not an export / checkpoint: one line, no traceback
