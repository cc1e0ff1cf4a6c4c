"""An export against the PyTorch model it came from: the figures of every validation.json.

- part_errors: max abs error of ONNX Runtime vs PyTorch per part on sample inputs (vision, projector, embed,
  decoder prefill logits and one decode step), with the limit a Tolerance allows;
- router_agreement: fraction of (token, MoE layer) pairs whose selected expert SET is the same, on one
  prefill. The export's router logits are read from a probe copy of decoder.onnx that exposes every
  router's output (export/routers.py finds them, for every lowering and for quantised graphs);
- greedy_agreement: fraction of generated tokens equal to PyTorch greedy (compared up to the first
  divergence, counted over the longer answer) on image + prompt samples;
- logit_cosine: cosine of the runtime's and PyTorch's next-token logits at the prefill and at every decode
  step teacher-forced with PyTorch's greedy answer.
export/validate.py turns them into pass / fail for fp32 / fp16, calibration/validation.py for quantised exports.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from PIL import Image
from tqdm import tqdm

from moe_llava.inference import pipeline_for
from moe_llava.loading import LoadedModel
from moe_llava.torch_engine import TorchEngine
from moe_llava.upcast import compute_dtype
from runtime.errors import UserError
from runtime.generation import Pipeline
from runtime.manifest import Manifest
from runtime.pipeline import load_pipeline

from .routers import router_nodes

PROMPTS = ("What is in the image?", "Describe the image briefly.")
PROBE_FILE = "_router_probe.onnx"


@dataclass(frozen=True)
class Tolerance:
    atol: float             # per-part: max|ort - torch| <= atol + rtol * max|torch|
    rtol: float
    router_agreement: float
    greedy_agreement: float


def sample_images(loaded: LoadedModel, count: int = 2) -> list[Image.Image]:
    """The checkpoint's example image when it has one, then drawn synthetic scenes (fixed seed)."""
    from moe_llava.data import draw_scene, sample_scene
    images = [Image.open(p).convert("RGB") for p in sorted(loaded.directory.glob("example*.png"))]
    rng = np.random.default_rng(0)
    while len(images) < count:
        images.append(draw_scene(sample_scene(rng)))
    return images[:count]


def decoder_feed(manifest: Manifest, embeds: np.ndarray) -> dict[str, np.ndarray]:
    """The decoder's inputs for a prefill of `embeds` [S,H] on an empty KV cache."""
    spec = manifest.decoder
    dtype = manifest.parts["decoder"].input("inputs_embeds").np_dtype
    s = len(embeds)
    feed = {"inputs_embeds": embeds[None].astype(dtype), "attention_mask": np.ones((1, s), np.int64),
            "position_ids": np.arange(s, dtype=np.int64)[None]}
    inputs, _ = spec.io_names()
    past_dtype = np.int8 if manifest.kv_cache == "int8" else dtype     # --kv-cache int8: GQA's quantised cache
    feed.update({name: np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), past_dtype) for name in inputs[3:]})
    return feed


# ---- per-part errors ----------------------------------------------------------------------------
def _session(path: Path):
    from runtime.ort_engine import import_onnxruntime
    ort = import_onnxruntime()  # one-line error without an ONNX Runtime package
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _error(got: np.ndarray, want: np.ndarray, tol: Tolerance) -> dict:
    limit = tol.atol + tol.rtol * float(np.abs(want).max())
    return {"max_abs_error": float(np.abs(got.astype(np.float32) - want).max()), "limit": limit}


def part_errors(loaded: LoadedModel, directory: Path, pixels: np.ndarray, tol: Tolerance) -> dict:
    manifest = Manifest.load(directory)
    model = loaded.model
    dtype = manifest.parts["vision"].input("pixel_values").np_dtype
    ref = compute_dtype(model)  # the reference runs in the dtype it was loaded in (fp16 exports: fp16)
    with torch.inference_mode():
        features = model.vision_tower(torch.from_numpy(pixels).to(ref)).float().numpy()
        embeds = model.projector(torch.from_numpy(features).to(ref)).float().numpy()
        ids = np.arange(1, 9, dtype=np.int64)[None] % model.config.vocab_size
        token_embeds = model.embed_tokens(torch.from_numpy(ids)).float().numpy()
    got = {"vision": _session(manifest.path("vision")).run(None, {"pixel_values": pixels.astype(dtype)})[0],
           "projector": _session(manifest.path("projector")).run(None, {"image_features": features.astype(dtype)})[0],
           "embed": _session(manifest.path("embed")).run(None, {"input_ids": ids})[0]}
    want = {"vision": features, "projector": embeds, "embed": token_embeds}
    errors = {k: _error(got[k], want[k], tol) for k in got}
    errors.update(decoder_errors(loaded, manifest, embeds[0], tol))
    return errors


def decoder_errors(loaded: LoadedModel, manifest: Manifest, visual: np.ndarray, tol: Tolerance) -> dict:
    """Prefill on [text, image, text] embeddings, then one decode step, against the PyTorch engine."""
    engine = TorchEngine(loaded.model)
    ids = np.arange(3, 10, dtype=np.int64) % loaded.config.vocab_size
    text = engine.embed_tokens(ids)
    embeds = np.concatenate([text[:3], visual, text[3:]])                       # [S,H]
    want_prefill = engine.prefill(embeds)
    want_decode = engine.decode(int(ids[0]))
    session = _session(manifest.path("decoder"))
    prefill = session.run(None, decoder_feed(manifest, embeds))
    dtype = manifest.parts["decoder"].input("inputs_embeds").np_dtype
    inputs, _ = manifest.decoder.io_names()
    step = {"inputs_embeds": text[None, :1].astype(dtype), "attention_mask": np.ones((1, len(embeds) + 1), np.int64),
            "position_ids": np.array([[len(embeds)]])}
    step.update(dict(zip(inputs[3:], prefill[1:])))
    decode = session.run(None, step)
    return {"decoder_prefill_logits": _error(prefill[0][0], want_prefill, tol),
            "decoder_decode_logits": _error(decode[0][0], want_decode, tol)}


# ---- router agreement ---------------------------------------------------------------------------
def router_agreement(loaded: LoadedModel, directory: Path, pixels: np.ndarray) -> float:
    """Same top-k expert set per (token, MoE layer) in the export and in PyTorch, on one prefill."""
    moes = loaded.model.moe_layers()
    if not moes:
        return 1.0
    engine = TorchEngine(loaded.model)
    text = engine.embed_tokens(np.arange(3, 9, dtype=np.int64) % loaded.config.vocab_size)
    embeds = np.concatenate([text[:2], engine.encode_images(pixels)[0], text[2:]])     # [S,H]
    want = []
    hooks = [m.router.register_forward_hook(lambda _m, _i, out: want.append(out.float().numpy())) for m in moes]
    try:
        engine.prefill(embeds)
    finally:
        for h in hooks:
            h.remove()
    manifest = Manifest.load(directory)
    probe, names = _router_probe(manifest)
    try:
        got = _session(probe).run(names, decoder_feed(manifest, embeds))
    finally:
        probe.unlink(missing_ok=True)
    if len(got) != len(want):
        raise UserError(f"{directory}: found {len(got)} router outputs for {len(want)} MoE layers")
    k = moes[0].top_k
    top = lambda logits: np.sort(np.argsort(-logits.reshape(-1, logits.shape[-1]), -1)[:, :k], -1)  # noqa: E731
    return float(np.mean([(top(a) == top(b)).all(-1).mean() for a, b in zip(got, want)]))


def _router_probe(manifest: Manifest) -> tuple[Path, list[str]]:
    """decoder.onnx with every router's logits as extra outputs (weights stay where they are)."""
    path = manifest.path("decoder")
    model = onnx.load(str(path), load_external_data=False)
    names = [n.output[0] for n in router_nodes(model)]
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in existing)
    probe = path.parent / PROBE_FILE
    onnx.save(model, str(probe))
    return probe, names


# ---- answers ------------------------------------------------------------------------------------
def first_divergence(want: list[int], got: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)


def greedy_agreement(loaded: LoadedModel, directory: Path, images, max_new_tokens: int,
                     keep_reference_logits: bool = False) -> tuple[float, list[dict]]:
    """Free-running greedy answers of PyTorch and the export, counted up to their first divergence.

    keep_reference_logits: each answer also carries "reference_logits" [n,V], PyTorch's logits as it chose
    its n tokens, which are its teacher-forced logits too: logit_cosine then runs no second PyTorch pass
    (at the released size on a CPU, PyTorch's steps are most of a validation)."""
    torch_pipe = pipeline_for(loaded)
    recorder = torch_pipe.engine = _LogitRecorder(torch_pipe.engine)
    matched = total = 0
    answers = []
    with load_pipeline(directory) as ort_pipe:
        for image, prompt in tqdm(list(zip(images, PROMPTS * len(images))), desc="validating: greedy answers",
                                  unit="answer", leave=False):
            recorder.rows.clear()
            want = torch_pipe.generate(image, prompt, max_new_tokens).token_ids
            got = ort_pipe.generate(image, prompt, max_new_tokens).token_ids
            same = first_divergence(want, got)
            matched += min(len(want), len(got)) if same is None else same
            total += max(len(want), len(got), 1)
            answers.append({"prompt": prompt, "pytorch": want, "runtime": got})
            if keep_reference_logits and want and len(recorder.rows) >= len(want):
                answers[-1]["reference_logits"] = np.stack(recorder.rows[:len(want)]).astype(np.float32)
    return matched / total, answers


class _LogitRecorder:
    """An Engine passed through, keeping the logits of the prompt and of each decode step of one answer."""

    def __init__(self, engine):
        self.engine, self.rows = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def prefill(self, embeds):
        return self._prompt(self.engine.prefill(embeds))

    def extend(self, embeds):
        return self._prompt(self.engine.extend(embeds))

    def decode(self, token):
        logits = self.engine.decode(token)
        self.rows.append(logits)
        return logits

    def _prompt(self, logits):
        self.rows[:] = [logits]   # the prompt's last piece gives the first answer token's logits
        return logits


def forced_logits(pipeline: Pipeline, image, prompt: str, tokens: list[int]) -> np.ndarray:
    """[1+n,V]: logits after the prompt, then after each of tokens[:n] fed back (n = len(tokens) - 1)."""
    ids = pipeline.prompt_ids(prompt, image is not None)
    visual = pipeline.engine.encode_images(pipeline.preprocess(image)[None])[0] if image is not None else None
    rows = [pipeline.engine.prefill(pipeline.prompt_embeds(ids, visual))]
    rows += [pipeline.engine.decode(t) for t in tokens[:-1]]
    return np.stack(rows).astype(np.float32)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def logit_cosine(loaded: LoadedModel, directory: Path, images, answers: list[dict]) -> tuple[dict, list[dict]]:
    """(cosine figures, divergences): PyTorch's logit margin where the export's greedy answer parts from it.

    The figures add argmax_agreement: the fraction of teacher-forced positions where the export's top token is
    PyTorch's (each position judged alone, unlike greedy_agreement, where one flip ends the answer's count)."""
    reference, values, same_top, divergences = pipeline_for(loaded), [], [], []
    with load_pipeline(directory) as runtime:
        for k, (image, answer) in enumerate(tqdm(list(zip(images, answers)), desc="validating: logits",
                                                 unit="answer", leave=False)):
            tokens = answer["pytorch"]
            want = answer.pop("reference_logits", None)
            want = forced_logits(reference, image, answer["prompt"], tokens) if want is None else want
            got = forced_logits(runtime, image, answer["prompt"], tokens)
            values += cosine_rows(got, want).tolist()
            same_top += (got.argmax(-1) == want.argmax(-1)).tolist()
            step = first_divergence(tokens, answer["runtime"])
            if step is not None:
                row = want[step]
                ours, theirs = tokens[step], answer["runtime"][step]
                divergences.append({"sample": k, "step": step, "reference_token": ours, "runtime_token": theirs,
                                    "reference_margin": float(row[ours] - row[theirs])})
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "positions": len(values),
            "argmax_agreement": float(np.mean(same_top))}, divergences
