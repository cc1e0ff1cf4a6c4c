"""README.md of the embedded demo model, written from the demo recipe's results (numbers never typed by hand)."""
from __future__ import annotations

NAMES = {"stage2": "stage II (dense)", "stage3": "stage III (MoE, the demo model)",
         "stage3_without_stage2": "stage III without stage II (RQ2 ablation)"}


def _pope_rows(models: dict) -> list[str]:
    rows = ["| model | POPE random F1 | popular F1 | adversarial F1 | yes-ratio (adv.) | open-question acc. |",
            "|---|---|---|---|---|---|"]
    for name, r in models.items():
        pope = r["pope"]
        rows.append(f"| {NAMES.get(name, name)} | {pope['random']['f1']:.3f} | {pope['popular']['f1']:.3f} | "
                    f"{pope['adversarial']['f1']:.3f} | {pope['adversarial']['yes_ratio']:.2f} | "
                    f"{r['open']['accuracy']:.3f} |")
    return rows


def model_card(results: dict, checkpoint_bytes: int) -> str:
    r, secs = results["recipe"], results["seconds"]
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in secs.items())
    cpu = ", ".join(f"{k} {v:.0f} s" for k, v in results["cpu_seconds"].items())
    lines = [
        "# MoE-LLaVA demo model (embedded)",
        "",
        "Written by `moe-train --recipe demo --out moe_llava/assets/demo`; loaded by `moe-run --model demo`.",
        "A toy: it knows only the synthetic shape scenes of `moe_llava.data` (8 shapes, 7 colours, 3x3 grid).",
        "",
        f"- Backbone: StableLM-shaped (`moe_llava_stablelm`), {r['layers']} layers, hidden {r['hidden']}, "
        f"FFN {r['ffn']}, {r['heads']} heads; MoE in every other layer (sparse), {r['num_experts']} experts, "
        f"top-{r['top_k']}.",
        f"- Vision tower: CLIP-shaped, {r['image_size']} px, patch {r['patch_size']}, width {r['tower_width']}, "
        f"{r['tower_layers']} layers, trained from scratch by a supervised stage 0 (see `moe_llava/train/tower.py`), "
        "then frozen for stages I-III.",
        f"- Data: {r['n_train']} training scenes (captions, instructions, text-only chats), "
        f"{r['n_heldout']} held-out scenes for evaluation; seed {r['seed']}.",
        f"- Checkpoint: {checkpoint_bytes / 2**20:.1f} MiB (fp32 safetensors, official MoE-LLaVA layout).",
        f"- Wall time on the 2-core development CPU: {timing}.",
        f"- CPU time (user + system, all threads): {cpu}.",
        "",
        "## Held-out results (greedy decoding, `moe-eval`)",
        "",
        *_pope_rows(results["models"]),
        "",
        "`results.json` has every number (accuracy, precision, recall, F1, yes-ratio per split, open-question",
        "accuracy per category, routing per MoE layer); `expert_loading.png` shows the stage-III routing split",
        "by image and text tokens; `loss_stage*.png` the training curves.",
        "",
    ]
    return "\n".join(lines)
