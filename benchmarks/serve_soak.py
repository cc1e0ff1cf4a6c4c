"""Soak test of moe-serve: 300 sequential requests, then 8 concurrent clients; latency, errors, server RSS.

    python benchmarks/serve_soak.py --engine-dir /tmp/serve/demo-onnx [--sequential 300] [--clients 8]
        [--per-client 40] [--threads 1] [--json report.json]

Starts `moe-serve` as a child process on a free 127.0.0.1 port and stops it at the end. Requests are two-turn
conversations about the demo's example image (one pixel changed per conversation, so every conversation has a
new image), alternately streamed and not. Reports p50 / p95 latency per phase, errors (must be 0: any
non-200 answer or malformed body), and the server's RSS growth from after a warm-up to the end (must stay
under 5 %). Time to first token of streamed first and follow-up turns is reported too (client side).
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "moe_llava" / "assets" / "demo"
QUESTION, FOLLOW_UP = "What is in the image?", "What colour is the star?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def image_url(i: int) -> str:
    image = Image.open(DEMO / "example.png").convert("RGB")
    image.putpixel((0, 0), (i % 256, i // 256 % 256, 7))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Client:
    """One keep-alive connection; request() -> (latency s, time to first content s or None, answer text)."""

    def __init__(self, port: int, model: str, max_tokens: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.model, self.max_tokens = model, max_tokens

    def request(self, messages: list[dict], stream: bool) -> tuple[float, float | None, str]:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "stream": stream})
        start = time.perf_counter()
        self.connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        if not stream:
            text = json.loads(response.read())["choices"][0]["message"]["content"]
            return time.perf_counter() - start, None, text
        first, pieces = None, []
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta and first is None:
                first = time.perf_counter() - start
            pieces.append(delta or "")
        return time.perf_counter() - start, first, "".join(pieces)

    def conversation(self, i: int, stream: bool, record) -> None:
        """Two turns about image i; record(turn, latency, ttft) for each."""
        first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(i)}},
                                              {"type": "text", "text": QUESTION}]}]
        latency, ttft, answer = self.request(first, stream)
        record(1, latency, ttft)
        follow = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UP}]
        latency, ttft, _ = self.request(follow, stream)
        record(2, latency, ttft)


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.latency: list[float] = []
        self.ttft: dict[int, list[float]] = {1: [], 2: []}
        self.errors: list[str] = []

    def __call__(self, turn: int, latency: float, ttft: float | None) -> None:
        with self.lock:
            self.latency.append(latency)
            if ttft is not None:
                self.ttft[turn].append(ttft)

    def summary(self) -> dict:
        ms = sorted(x * 1e3 for x in self.latency)
        p = (lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]) if ms else (lambda q: float("nan"))
        ttft = {t: statistics.median(v) * 1e3 for t, v in self.ttft.items() if v}
        return {"requests": len(ms), "errors": len(self.errors), "p50_ms": p(0.50), "p95_ms": p(0.95),
                "ttft_turn1_ms": ttft.get(1), "ttft_turn2_ms": ttft.get(2), "first_errors": self.errors[:3]}


def run_conversations(port: int, model: str, max_tokens: int, start: int, count: int, rec: Recorder) -> None:
    client = Client(port, model, max_tokens)
    for i in range(start, start + count):
        try:
            client.conversation(i, stream=i % 2 == 0, record=rec)
        except Exception as e:  # counted, and the soak goes on with a fresh connection
            rec.errors.append(f"{type(e).__name__}: {e}")
            client = Client(port, model, max_tokens)


def start_server(args, port: int) -> subprocess.Popen:
    command = [sys.executable, "-c", "import sys, cli; sys.exit(cli.serve_main())", "--engine-dir",
               args.engine_dir, "--port", str(port), "--model-name", "soak", "--max-queue", str(args.clients * 2)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    server = subprocess.Popen(command, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                                      "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("moe-serve did not start")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", required=True)
    p.add_argument("--sequential", type=int, default=300, help="requests (two per conversation)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per-client", type=int, default=40, help="requests per concurrent client")
    p.add_argument("--warmup", type=int, default=20, help="requests before the RSS baseline")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=None, help="the server's decoder threads")
    p.add_argument("--json")
    args = p.parse_args(argv)
    port = free_port()
    server = start_server(args, port)
    try:
        warm = Recorder()
        run_conversations(port, "soak", args.max_tokens, 10**6, args.warmup // 2, warm)
        rss_start = rss_mb(server.pid)
        sequential = Recorder()
        run_conversations(port, "soak", args.max_tokens, 0, args.sequential // 2, sequential)
        concurrent = Recorder()
        with ThreadPoolExecutor(args.clients) as pool:
            for c in range(args.clients):
                pool.submit(run_conversations, port, "soak", args.max_tokens, 10**5 * (c + 1),
                            args.per_client // 2, concurrent)
        rss_end = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    report = {"sequential": sequential.summary(), "concurrent": concurrent.summary(),
              "warmup_errors": len(warm.errors), "clients": args.clients,
              "rss_after_warmup_mb": rss_start, "rss_end_mb": rss_end,
              "rss_growth_pct": 100 * (rss_end - rss_start) / rss_start}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    ok = report["rss_growth_pct"] < 5 and not (sequential.errors or concurrent.errors or warm.errors)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
