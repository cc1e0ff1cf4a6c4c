"""The gpu-check report: one Markdown and one JSON file per run, `<date>-<device>.md|.json` in the output folder."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

LOG_LIMIT = 20_000  # characters of each step's captured output kept in the JSON (the tail: errors come last)
MD_LOG_LIMIT = 3_000  # ... and in the Markdown, for failed steps only


class Status(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"  # the step's hardware/software is absent (never used for a step that could run)


@dataclass
class StepResult:
    name: str
    status: Status
    seconds: float
    summary: str  # one line: what was checked and how it went
    figures: dict = field(default_factory=dict)  # every number the step measured
    log: str = ""  # captured stdout + stderr of the step's subprocesses

    def to_json(self) -> dict:
        d = asdict(self)
        d["status"] = self.status.value
        d["log"] = self.log[-LOG_LIMIT:]
        return d


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown-device"


def report_stem(date: str, device: str) -> str:
    return f"{date}-{slug(device)}"


def write_report(out_dir: Path, date: str, environment: dict, steps: list[StepResult], command: str) -> list[Path]:
    """Writes both files (the folder is created); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report_stem(date, environment.get("device", "unknown"))
    ok = all(s.status is not Status.FAIL for s in steps)
    doc = {"date": date, "command": command, "passed": ok, "total_seconds": round(sum(s.seconds for s in steps), 1),
           "environment": environment, "steps": [s.to_json() for s in steps]}
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md_path.write_text(markdown(doc))
    return [md_path, json_path]


def cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"# gpu-check {doc['date']}: {env.get('device', '?')} - {'PASSED' if doc['passed'] else 'FAILED'}", "",
             f"Command: `{doc['command']}`", "", "| component | version |", "|---|---|"]
    lines += [f"| {k} | {cell(v)} |" for k, v in env.items()]
    lines += ["", "| step | result | seconds | summary |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status'].upper()} | {s['seconds']:.1f} | {cell(s['summary'])} |"
              for s in doc["steps"]]
    for s in doc["steps"]:
        lines += ["", f"## {s['name']}: {s['status'].upper()}", "", s["summary"]]
        if s["figures"]:
            lines += ["", "```json", json.dumps(s["figures"], indent=1, default=str), "```"]
        if s["status"] == Status.FAIL.value and s["log"]:
            lines += ["", "Output (tail):", "", "```", s["log"][-MD_LOG_LIMIT:], "```"]
    return "\n".join(lines) + "\n"
