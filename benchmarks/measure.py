"""One backend's measurements in its own process; interleaved rounds across those processes.

Parent side: `measure_interleaved({name: WorkerSpec})` starts one worker process per entry
(`python -m benchmarks.measure SPEC`), waits until each has loaded its model, then sends `run` to each
in turn, round after round (A B, B A, A B, ...), so machine drift hits every side alike;
the first `warmup` rounds are dropped. Each worker finally reports its peak resident memory. Only the worker's
own process counts: the PyTorch worker never loads onnxruntime and the runtime worker never imports torch.

Worker side, one run (greedy, the same steps as runtime.generation.Pipeline, but EOS ignored so every run
decodes exactly `new_tokens - 1` steps; the Pipeline itself is not changed):
  preprocess (load + pixels) -> vision tower -> projector -> prompt embeddings -> prefill -> argmax = TTFT,
  then `decode(token)` -> argmax, new_tokens - 1 times.
Protocol: one JSON line per reply on the worker's original stdout; anything else it prints goes to stderr.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime.errors import UserError

BACKENDS = ("pytorch", "onnxruntime")  # the default pair
RUNTIME_BACKENDS = ("onnxruntime", "tensorrt")  # the "runtime" side: one of these per run
METRICS = ("preprocess_ms", "vision_ms", "projector_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token",
           "decode_tok_s")
SETTLE_S = 0.02  # pause between runs so a finished side's spinning threads stop before the next side starts


@dataclass(frozen=True)
class WorkerSpec:
    backend: str          # "pytorch" | "onnxruntime" | "tensorrt"
    source: str           # checkpoint dir or 'demo' (pytorch), export dir (onnxruntime, tensorrt)
    prompt: str
    new_tokens: int       # tokens generated per run: 1 from prefill + new_tokens - 1 decode steps
    threads: int
    image: str | None = None  # None: a fixed synthetic picture
    device: str = "cpu"   # "cpu" | "cuda" (PyTorch eager fp16 there)


# ---- worker side ------------------------------------------------------------------------------------
class Side:
    """A loaded backend: the Pipeline (prompt building, engine) plus the vision tower and projector apart.
    `sync` waits for the device before each lap (a no-op where results come back as host arrays)."""

    def __init__(self, pipeline, vision, projector, sync=lambda: None):
        self.pipeline, self.vision, self.projector, self.sync = pipeline, vision, projector, sync

    def run(self, image, prompt: str, new_tokens: int) -> dict:
        """`image`: a path (read in every run, as moe-run does) or a PIL image."""
        from runtime.preprocess import load_image
        p, times = self.pipeline, {}
        start = last = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal last
            self.sync()
            now = time.perf_counter()
            times[name], last = (now - last) * 1e3, now
        pixels = p.preprocess(load_image(image) if isinstance(image, str) else image)[None]  # [1,3,h,w]
        lap("preprocess_ms")
        features = self.vision(pixels)                                    # [1,P,Dv]
        lap("vision_ms")
        visual = self.projector(features)[0]                              # [P,H]
        lap("projector_ms")
        ids = p.prompt_ids(prompt, with_image=True)
        embeds = p.prompt_embeds(ids, visual)                             # [S,H]
        tokens = [int(np.argmax(p.engine.prefill(embeds)))]
        lap("prefill_ms")
        times["ttft_ms"] = (last - start) * 1e3
        for _ in range(new_tokens - 1):
            tokens.append(int(np.argmax(p.engine.decode(tokens[-1]))))
        lap("decode_ms")
        steps = new_tokens - 1
        times["decode_ms_per_token"] = times["decode_ms"] / steps
        times["decode_tok_s"] = steps / (times["decode_ms"] / 1e3)
        return {**times, "prompt_tokens": len(embeds), "token_ids": tokens}


def open_side(spec: WorkerSpec) -> Side:
    openers = {"pytorch": _open_pytorch, "onnxruntime": _open_onnxruntime, "tensorrt": _open_tensorrt}
    return openers[spec.backend](spec)


def _open_pytorch(spec: WorkerSpec) -> Side:
    import torch

    from moe_llava.inference import torch_pipeline
    torch.set_num_threads(spec.threads)
    cuda = spec.device == "cuda"
    pipeline = torch_pipeline(spec.source, device=spec.device, dtype=torch.float16 if cuda else torch.float32)
    engine = pipeline.engine
    model = engine.model

    @torch.inference_mode()
    def vision(pixels: np.ndarray):
        return model.vision_tower(torch.from_numpy(pixels).to(engine.device, engine.vision_dtype))

    @torch.inference_mode()
    def projector(features) -> np.ndarray:
        return model.projector(features).float().cpu().numpy()
    return Side(pipeline, vision, projector, torch.cuda.synchronize if cuda else lambda: None)


def _open_onnxruntime(spec: WorkerSpec) -> Side:
    from runtime.device import Device, open_runtime
    pipeline, _ = open_runtime(spec.source, "onnxruntime", Device(spec.device), "moe-bench worker", spec.threads)
    sessions = pipeline.engine.sessions
    vision = lambda pixels: sessions["vision"].run(pixel_values=pixels)[0]           # noqa: E731
    projector = lambda features: sessions["projector"].run(image_features=features)[0].astype(np.float32)  # noqa: E731
    return Side(pipeline, vision, projector)


def _open_tensorrt(spec: WorkerSpec) -> Side:
    """The TensorRT engines' image encoder runs tower and projector in one go: vision_ms holds both."""
    from runtime.device import Device, open_runtime
    pipeline, _ = open_runtime(spec.source, "tensorrt", Device.CUDA, "moe-bench worker")
    return Side(pipeline, pipeline.engine.encode_images, lambda visual: visual)


def synthetic_image():
    from PIL import Image
    y, x = np.mgrid[0:336, 0:448]  # a fixed 448x336 picture: gradients and a square (exercises the padding)
    rgb = np.stack([x * 255 // 447, y * 255 // 335, (x + y) * 255 // 782], axis=-1).astype(np.uint8)
    rgb[100:200, 150:250] = (200, 30, 30)
    return Image.fromarray(rgb)


def peak_rss_mb() -> float:
    """This process's peak resident memory. /proc's VmHWM, not getrusage: ru_maxrss survives exec and would
    report the parent's peak when that was higher."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def worker_main(argv: list[str]) -> int:
    spec = WorkerSpec(**json.loads(argv[0]))
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints (ours, libraries', C code's) must not corrupt the protocol

    def send(message: dict) -> None:
        reply.write(json.dumps(message) + "\n")
        reply.flush()
    start = time.perf_counter()
    side = open_side(spec)
    send({"ready": True, "load_s": time.perf_counter() - start, "load_peak_rss_mb": peak_rss_mb()})
    image = spec.image or synthetic_image()
    for line in sys.stdin:
        if line.strip() == "run":
            send(side.run(image, spec.prompt, spec.new_tokens))
        else:
            break
    send({"peak_rss_mb": peak_rss_mb(), "imports_torch": "torch" in sys.modules,
          "imports_onnxruntime": "onnxruntime" in sys.modules})
    return 0


# ---- parent side ------------------------------------------------------------------------------------
class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, name: str, spec: WorkerSpec):
        self.name, self.spec = name, spec
        self.log = tempfile.TemporaryFile(mode="w+")
        root = str(Path(__file__).resolve().parents[1])  # the repository, so the child imports these packages
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.measure", json.dumps(asdict(spec))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        env=env)

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.log.seek(0)
            tail = "\n".join(self.log.read().strip().splitlines()[-15:])
            raise UserError(f"the {self.name} measurement process failed (exit {self.process.returncode}):\n{tail}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


def measure_interleaved(specs: dict[str, WorkerSpec], warmup: int, runs: int, progress=None) -> dict[str, dict]:
    """{name: summary}: medians of `runs` interleaved runs after `warmup` rounds, plus peak RSS and load time."""
    workers = {name: Worker(name, spec) for name, spec in specs.items()}
    try:
        ready = {name: w.receive() for name, w in workers.items()}
        samples: dict[str, list[dict]] = {name: [] for name in workers}
        for round_ in range(warmup + runs):
            # A B, B A, A B ...: linear drift cancels, and no side always follows the same neighbour
            for name in (list(workers) if round_ % 2 == 0 else reversed(list(workers))):
                worker = workers[name]
                time.sleep(SETTLE_S)
                result = worker.ask("run")
                if round_ >= warmup:
                    samples[name].append(result)
            if progress:
                progress(round_ + 1, warmup + runs)
        final = {name: w.ask("exit") for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    return {name: summarize(samples[name], ready[name], final[name]) for name in workers}


def summarize(samples: list[dict], ready: dict, final: dict) -> dict:
    out = {m: statistics.median(s[m] for s in samples) for m in METRICS}
    out["decode_tok_s"] = 1e3 / out["decode_ms_per_token"]  # consistent with the ms even for an even count
    out["peak_rss_mb"] = final["peak_rss_mb"]
    out["imports_torch"], out["imports_onnxruntime"] = final["imports_torch"], final["imports_onnxruntime"]
    out["load_s"], out["load_peak_rss_mb"] = ready["load_s"], ready["load_peak_rss_mb"]
    out["runs"], out["prompt_tokens"] = len(samples), samples[0]["prompt_tokens"]
    out["spread"] = {m: [min(s[m] for s in samples), max(s[m] for s in samples)]
                     for m in ("ttft_ms", "decode_tok_s")}
    out["token_ids"] = samples[0]["token_ids"]
    return out


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
