"""validation.json: every export checked against the PyTorch model it came from.

- per part: max abs error of ONNX Runtime vs PyTorch on sample inputs (vision, projector, embed, decoder
  prefill logits and one decode step);
- router top-k agreement: fraction of (token, MoE layer) pairs whose selected expert SET is the same. The
  router logits are read from a probe copy of decoder.onnx that exposes them as extra outputs;
- greedy_agreement: fraction of generated tokens equal to PyTorch greedy (compared up to the first
  divergence, counted over the longer answer) on a few image + prompt samples.
The export fails, with the figures in the message, when a tolerance is exceeded.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from PIL import Image

from moe_llava.engine import TorchEngine
from moe_llava.loading import LoadedModel
from runtime.errors import UserError
from runtime.generation import Pipeline
from runtime.manifest import Manifest
from runtime.pipeline import load_pipeline

PROMPTS = ("What is in the image?", "Describe the image briefly.")
PROBE_FILE = "_router_probe.onnx"


@dataclass(frozen=True)
class Tolerance:
    atol: float             # per-part: max|ort - torch| <= atol + rtol * max|torch|
    rtol: float
    router_agreement: float
    greedy_agreement: float


TOLERANCES = {"fp32": Tolerance(1e-4, 1e-4, 0.99, 0.9), "fp16": Tolerance(5e-2, 5e-2, 0.9, 0.5),
              # quantised exports: greedy agreement is gated in calibration/validation.py (with logit cosine and
              # POPE) only for models that can answer at all - a random tiny model's near-tied logits flip anyway
              "int8": Tolerance(5e-2, 0.25, 0.9, 0.0), "int4": Tolerance(0.1, 0.5, 0.85, 0.0)}


def validate_export(loaded: LoadedModel, directory: Path, max_new_tokens: int = 12) -> dict:
    """Compare the export in `directory` with PyTorch; write validation.json; raise when out of tolerance."""
    if Manifest.load(directory).moe_impl == "plugin":  # no TensorRT here: run the equivalent ORT graph
        import tempfile
        from .plugin_swap import ort_equivalent_dir
        with tempfile.TemporaryDirectory() as tmp:
            report = compare(loaded, ort_equivalent_dir(directory, Path(tmp)), max_new_tokens)
        report["validated_with"] = "plugin nodes swapped for the equivalent com.microsoft.MoE (onnxruntime CPU)"
    else:
        report = compare(loaded, directory, max_new_tokens)
    (directory / "validation.json").write_text(json.dumps(report, indent=2) + "\n")
    if report["failures"]:
        raise UserError("export failed validation against PyTorch: " + "; ".join(report["failures"]))
    return report


def compare(loaded: LoadedModel, directory: Path, max_new_tokens: int) -> dict:
    manifest = Manifest.load(directory)
    tol = TOLERANCES[manifest.precision]
    samples = sample_images(loaded)
    pixels = np.stack([loaded.image_processor(img) for img in samples])
    parts = part_errors(loaded, directory, pixels)
    router = router_agreement(loaded, directory, pixels[:1])
    greedy, answers = greedy_agreement(loaded, directory, samples, max_new_tokens)
    failures = tolerance_failures(parts, router, greedy, tol)
    return {"precision": manifest.precision, "moe_impl": manifest.moe_impl, "parts": parts,
            "router_agreement": router, "greedy_agreement": greedy, "samples": answers,
            "tolerance": asdict(tol), "passed": not failures, "failures": failures}


def tolerance_failures(parts: dict, router: float, greedy: float, tol: Tolerance) -> list[str]:
    failures = [f"{name}: max abs error {e['max_abs_error']:.3g} > {e['limit']:.3g}"
                for name, e in parts.items() if e["max_abs_error"] > e["limit"]]
    if router < tol.router_agreement:
        failures.append(f"router top-k agreement {router:.3f} < {tol.router_agreement}")
    if greedy < tol.greedy_agreement:
        failures.append(f"greedy agreement {greedy:.3f} < {tol.greedy_agreement}")
    return failures


def sample_images(loaded: LoadedModel, count: int = 2) -> list[Image.Image]:
    """The checkpoint's example image when it has one, then drawn synthetic scenes (fixed seed)."""
    from moe_llava.data import draw_scene, sample_scene
    images = [Image.open(p).convert("RGB") for p in sorted(loaded.directory.glob("example*.png"))]
    rng = np.random.default_rng(0)
    while len(images) < count:
        images.append(draw_scene(sample_scene(rng)))
    return images[:count]


def _limit(reference: np.ndarray, tol: Tolerance) -> float:
    return tol.atol + tol.rtol * float(np.abs(reference).max())


def part_errors(loaded: LoadedModel, directory: Path, pixels: np.ndarray) -> dict:
    import onnxruntime as ort
    manifest = Manifest.load(directory)
    tol = TOLERANCES[manifest.precision]
    model = loaded.model
    session = lambda part: ort.InferenceSession(str(manifest.path(part)), providers=["CPUExecutionProvider"])  # noqa: E731
    dtype = manifest.parts["vision"].input("pixel_values").np_dtype
    ref = next(model.parameters()).dtype  # the reference runs in the dtype it was loaded in (fp16 exports: fp16)
    with torch.inference_mode():
        features = model.vision_tower(torch.from_numpy(pixels).to(ref)).float().numpy()
        embeds = model.projector(torch.from_numpy(features).to(ref)).float().numpy()
        ids = np.arange(1, 9, dtype=np.int64)[None] % model.config.vocab_size
        token_embeds = model.embed_tokens(torch.from_numpy(ids)).float().numpy()
    got = {"vision": session("vision").run(None, {"pixel_values": pixels.astype(dtype)})[0],
           "projector": session("projector").run(None, {"image_features": features.astype(dtype)})[0],
           "embed": session("embed").run(None, {"input_ids": ids})[0]}
    want = {"vision": features, "projector": embeds, "embed": token_embeds}
    errors = {k: _error(got[k], want[k], tol) for k in got}
    errors.update(decoder_errors(loaded, manifest, session("decoder"), embeds[0], tol))
    return errors


def _error(got: np.ndarray, want: np.ndarray, tol: Tolerance) -> dict:
    return {"max_abs_error": float(np.abs(got.astype(np.float32) - want).max()), "limit": _limit(want, tol)}


def decoder_errors(loaded, manifest, session, visual: np.ndarray, tol: Tolerance) -> dict:
    """Prefill on [text, image, text] embeddings, then one decode step, against the PyTorch engine."""
    engine = TorchEngine(loaded.model)
    ids = np.arange(3, 10, dtype=np.int64) % loaded.config.vocab_size
    text = engine.embed_tokens(ids)
    embeds = np.concatenate([text[:3], visual, text[3:]])                       # [S,H]
    want_prefill = engine.prefill(embeds)
    want_decode = engine.decode(int(ids[0]))
    spec = manifest.decoder
    dtype = manifest.parts["decoder"].input("inputs_embeds").np_dtype
    empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype)
    feeds = {"inputs_embeds": embeds[None].astype(dtype), "attention_mask": np.ones((1, len(embeds)), np.int64),
             "position_ids": np.arange(len(embeds))[None]}
    inputs, outputs = spec.io_names()
    feeds.update({name: empty for name in inputs[3:]})
    prefill = session.run(None, feeds)
    step = {"inputs_embeds": text[None, :1].astype(dtype), "attention_mask": np.ones((1, len(embeds) + 1), np.int64),
            "position_ids": np.array([[len(embeds)]])}
    step.update(dict(zip(inputs[3:], prefill[1:])))
    decode = session.run(None, step)
    return {"decoder_prefill_logits": _error(prefill[0][0], want_prefill, tol),
            "decoder_decode_logits": _error(decode[0][0], want_decode, tol)}


def router_agreement(loaded: LoadedModel, directory: Path, pixels: np.ndarray) -> float:
    """Same top-k expert set per (token, MoE layer) in ONNX Runtime and PyTorch, on one prefill."""
    import onnxruntime as ort
    moes = loaded.model.moe_layers()
    if not moes:
        return 1.0
    manifest = Manifest.load(directory)
    probe, names = _router_probe(manifest)
    try:
        engine = TorchEngine(loaded.model)
        visual = engine.encode_images(pixels)[0]
        text = engine.embed_tokens(np.arange(3, 9, dtype=np.int64) % loaded.config.vocab_size)
        embeds = np.concatenate([text[:2], visual, text[2:]])
        captured = []
        hooks = [m.router.register_forward_hook(lambda _m, _i, out: captured.append(out.float().numpy()))
                 for m in moes]
        try:
            engine.prefill(embeds)
        finally:
            for h in hooks:
                h.remove()
        spec = manifest.decoder
        dtype = manifest.parts["decoder"].input("inputs_embeds").np_dtype
        inputs, _ = spec.io_names()
        feeds = {"inputs_embeds": embeds[None].astype(dtype), "attention_mask": np.ones((1, len(embeds)), np.int64),
                 "position_ids": np.arange(len(embeds))[None]}
        feeds.update({n: np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype) for n in inputs[3:]})
        session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
        got = session.run(names, feeds)
    finally:
        probe.unlink(missing_ok=True)
    k = moes[0].top_k
    agree = [np.sort(np.argsort(-a, -1)[:, :k], -1) == np.sort(np.argsort(-b, -1)[:, :k], -1)
             for a, b in zip(got, captured)]
    return float(np.mean([row.all() for a in agree for row in a]))


def _router_probe(manifest: Manifest) -> tuple[Path, list[str]]:
    """decoder.onnx with each MoE layer's router logits added as outputs (weights stay external)."""
    path = manifest.path("decoder")
    model = onnx.load(str(path), load_external_data=False)
    producers = {out: node for node in model.graph.node for out in node.output}
    names = []
    for node in model.graph.node:
        if node.op_type in ("MoE", "QMoE", "MoELlavaMoE"):
            logits = node.input[1]
            cast = producers.get(logits)  # ORT's op takes the fp32 logits cast like the hidden states
            names.append(cast.input[0] if cast is not None and cast.op_type in ("Cast", "CastLike") else logits)
        elif node.op_type == "TopK" and producers.get(node.input[0]) is not None \
                and producers[node.input[0]].op_type == "Softmax":
            names.append(producers[node.input[0]].input[0])
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe = path.parent / PROBE_FILE
    onnx.save(model, str(probe))
    return probe, names


def greedy_agreement(loaded: LoadedModel, directory: Path, images, max_new_tokens: int):
    torch_pipe = Pipeline(TorchEngine(loaded.model), loaded.tokenizer, loaded.template,
                          loaded.image_processor.spec, loaded.eos_token_id, loaded.bos_token_id,
                          preprocess=loaded.image_processor)
    matched = total = 0
    answers = []
    with load_pipeline(directory) as ort_pipe:
        for image, prompt in zip(images, PROMPTS * len(images)):
            want = torch_pipe.generate(image, prompt, max_new_tokens).token_ids
            got = ort_pipe.generate(image, prompt, max_new_tokens).token_ids
            same = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            matched += same
            total += max(len(want), len(got), 1)
            answers.append({"prompt": prompt, "pytorch": want, "runtime": got})
    return matched / total, answers
