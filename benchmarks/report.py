"""The printed tables and the PNG charts of a bench report (the dict that is also written as JSON)."""
from __future__ import annotations

import sys
from pathlib import Path

from .machine import busy_warning

SIDES = ("pytorch", "runtime")


def log(message: str) -> None:
    print(f"moe-bench: {message}", file=sys.stderr, flush=True)


def progress(done: int, total: int) -> None:
    print(f"\rmoe-bench: round {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


def _sides(report: dict) -> list[str]:
    return [s for s in SIDES if s in report]


def _label(report: dict, side: str) -> str:
    return report.get("runtime_backend", "runtime") if side == "runtime" else "pytorch"


def _ratio(report: dict, key: str, higher_is_better: bool) -> str:
    if not all(s in report for s in SIDES):
        return ""
    a, b = report["pytorch"][key], report["runtime"][key]
    if not a or not b:
        return ""
    r = b / a if higher_is_better else a / b
    return f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"


def bench_table(report: dict) -> str:
    sides, roof = _sides(report), report.get("roofline", {})
    m, s = report["model"], report["settings"]
    head = (f"moe-bench {m['source']}: {m['model_type']}, {m['layers']} layers, hidden {m['hidden']}, "
            f"E={m['experts']} k={m['top_k']}, {m['params_total'] / 1e6:.1f}M LM params "
            f"({m['params_active'] / 1e6:.1f}M active){', MoE ' + m['moe_impl'] if m.get('moe_impl') else ''} | "
            f"{s.get('device', 'cpu')}, {s['threads']} threads, median of {s['runs']} runs "
            f"after {s['warmup']} warm-up, prompt {report[sides[0]]['prompt_tokens']} positions, "
            f"{s['decode_steps']} decode steps")
    rows = [("preprocess ms", "preprocess_ms", "{:.2f}", False), ("vision encode ms", "vision_ms", "{:.2f}", False),
            ("projector ms", "projector_ms", "{:.2f}", False), ("prefill ms", "prefill_ms", "{:.2f}", False),
            ("time to first token ms", "ttft_ms", "{:.2f}", False), ("decode tokens/s", "decode_tok_s", "{:.1f}", True),
            ("decode ms/token", "decode_ms_per_token", "{:.2f}", False)]
    lines = [head, f"{'':28}" + "".join(f"{_label(report, x):>14}" for x in sides) + f"{'runtime vs pytorch':>22}"]
    for label, key, fmt, better_high in rows:
        cells = "".join(f"{fmt.format(report[x][key]):>14}" for x in sides)
        lines.append(f"{label:28}{cells}{_ratio(report, key, better_high):>22}")
    if roof:  # int8/int4 exports have no simple weight byte count: their cells read "-"
        cell = lambda table, x, fmt: fmt.format(roof[table][x]) if x in roof[table] else "-"  # noqa: E731
        lines.append(f"{'decode weight GB/s':28}" + "".join(f"{cell('achieved_gbs', x, '{:.2f}'):>14}" for x in sides))
        lines.append(f"{'% of decode roofline':28}" + "".join(f"{cell('pct_of_roofline', x, '{:.1f}%'):>14}" for x in sides)
                     + f"   ceiling {min(roof['ceiling_tok_s'].values()):.1f} tok/s at "
                     f"{roof['bandwidth_gbs']:.1f} GB/s copy")
        lines.append(f"{'% of a GEMV read rate':28}"
                     + "".join(f"{cell('pct_of_gemv_read', x, '{:.1f}%'):>14}" for x in sides)
                     + f"   GEMV reads {roof['bandwidth']['gemv_read_gbs']:.1f} GB/s")
    rss = "".join(f"{report[x]['peak_rss_mb']:>14.0f}" for x in sides)
    ratio = (f"{report['runtime']['peak_rss_mb'] / report['pytorch']['peak_rss_mb']:.2f}x of pytorch"
             if len(sides) == 2 else "")
    lines.append(f"{'peak RSS MB':28}{rss}{ratio:>22}")
    if roof:
        b = roof["breakdown"]
        lines.append(f"weights read per decode token: {b['total'] / 1e6:.1f} MB (dense {b['dense'] / 1e6:.1f}, "
                     f"{m['top_k']} of {m['experts']} experts {b['experts_active'] / 1e6:.1f} of "
                     f"{b['experts_total'] / 1e6:.1f}, lm_head {b['lm_head'] / 1e6:.1f}) at fp32")  # command._roofline
    if "agreement" in report:
        lines.append(f"greedy tokens equal on both sides: {report['agreement']['greedy_tokens']:.0%}")
    warning = busy_warning(report["machine"])
    return "\n".join(lines + ([warning] if warning else []))


def scaling_table(scaling: dict) -> str:
    sides = [s for s in SIDES if s in scaling["points"][0]]
    lines = [f"MoE scaling ({scaling['preset']} preset, k={scaling['top_k']}, equal active size): decode ms/token "
             f"and prefill ms ({scaling['prompt_tokens']} positions), median of {scaling['runs']} runs",
             f"{'E':>4}{'total M':>10}{'active M':>10}" + "".join(f"{x + ' dec':>14}{x + ' pre':>14}" for x in sides)]
    for p in scaling["points"]:
        cells = "".join(f"{p[x]['decode_ms_per_token']:>14.2f}{p[x]['prefill_ms']:>14.1f}" for x in sides)
        lines.append(f"{p['experts']:>4}{p['params_total'] / 1e6:>10.1f}{p['params_active'] / 1e6:>10.1f}{cells}")
    r = scaling["ratios"]
    cells = "".join(f"{r[x]['decode']:>14.2f}{r[x]['prefill']:>14.2f}" for x in sides)
    lines.append(f"{'ratio E' + str(r['experts'][1]) + '/E' + str(r['experts'][0]):>24}{cells}"
                 f"   (total params x{r['params_total']:.2f})")
    return "\n".join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_bench(report: dict, path: str | Path) -> Path:
    plt = _pyplot()
    sides = _sides(report)
    names = [_label(report, x) for x in sides]
    colors = [{"pytorch": "#8c8c8c", "runtime": "#1f77b4"}[x] for x in sides]
    panels = [("time to first token (ms)", "ttft_ms"), ("vision + projector (ms)", None),
              ("decode tokens/s", "decode_tok_s"), ("peak RSS (MB)", "peak_rss_mb")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (title, key) in zip(axes, panels):
        values = [report[x]["vision_ms"] + report[x]["projector_ms"] if key is None else report[x][key]
                  for x in sides]
        bars = ax.bar(names, values, color=colors)
        pct = report.get("roofline", {}).get("pct_of_roofline", {})
        labels = [_num(v) + (f"\n{pct[x]:.0f}% of roofline" if key == "decode_tok_s" and x in pct else "")
                  for v, x in zip(values, sides)]
        ax.bar_label(bars, labels=labels, fontsize=8)
        ax.margins(y=0.18)
        ax.set_title(title, fontsize=10)
        if key == "decode_tok_s" and "roofline" in report:
            ceiling = report["roofline"]["ceiling_tok_s"]["runtime" if "runtime" in sides else "pytorch"]
            ax.axhline(ceiling, color="#d62728", linestyle="--", linewidth=1)
            ax.set_ylim(0, max(max(values), ceiling) * 1.15)
            ax.text(-0.4, ceiling, f" roofline {ceiling:.0f}", color="#d62728", va="bottom", fontsize=8)
    m = report["model"]
    fig.suptitle(f"moe-bench: {Path(m['source']).name} (E={m['experts']}, k={m['top_k']}), "
                 f"{report['settings']['threads']} threads, {report['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_scaling(scaling: dict, path: str | Path) -> Path:
    """Cost relative to the smallest E, per backend, against the growth of total parameters (dotted)."""
    plt = _pyplot()
    points = scaling["points"]
    experts = [p["experts"] for p in points]
    sides = [s for s in SIDES if s in points[0]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = [("decode_ms_per_token", "decode time per token", "ms/token"), ("prefill_ms", "prefill time", "ms")]
    for ax, (key, title, unit) in zip(axes, panels):
        for side, color in zip(sides, ["#8c8c8c", "#1f77b4"]):
            values = [p[side][key] for p in points]
            ax.plot(experts, [v / values[0] for v in values], "o-", color=color,
                    label=f"{side}: " + " / ".join(_num(v) for v in values) + f" {unit}")
        ax.plot(experts, [p["params_total"] / points[0]["params_total"] for p in points], ":", color="#d62728",
                label="total parameters (if cost followed them)")
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(experts, [str(e) for e in experts])
        ax.set_xlabel(f"experts E (k={scaling['top_k']}, equal active parameters)")
        ax.set_ylabel(f"relative to E={experts[0]}")
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"MoE scaling ({scaling['preset']} preset): cost follows active, not total, parameters",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
