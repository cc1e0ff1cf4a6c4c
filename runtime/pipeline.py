"""load_pipeline: an export directory -> a ready Pipeline (engine + tokenizer + template + image spec)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from runtime.errors import UserError
from runtime.generation import Pipeline
from runtime.manifest import Manifest

BACKENDS = ("onnxruntime", "tensorrt")


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise UserError(f"{path}: cannot load tokenizer: {str(e).splitlines()[0]}") from None


def load_engine(engine_dir: str | Path, manifest: Manifest, backend: str, providers: Sequence[str] | None,
                threads: int | None, max_len: int | None):
    if backend == "onnxruntime":
        from runtime.ort_engine import OrtEngine

        return OrtEngine(engine_dir, manifest, providers=providers, threads=threads, max_len=max_len)
    if backend == "tensorrt":
        from runtime.tensorrt.engine import TrtEngine

        return TrtEngine(engine_dir, manifest, max_len=max_len)  # providers/threads are onnxruntime's
    raise UserError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def load_pipeline(engine_dir: str | Path, backend: str = "onnxruntime", providers: Sequence[str] | None = None,
                  threads: int | None = None, max_len: int | None = None) -> Pipeline:
    manifest = Manifest.load(engine_dir)
    tokenizer = load_tokenizer(manifest.tokenizer_path)
    engine = load_engine(engine_dir, manifest, backend, providers, threads, max_len)
    special = manifest.special_tokens
    visual_tokens = manifest.parts["vision"].output("image_features").shape[1]  # [N,P,Dv]; P may be symbolic
    return Pipeline(engine, tokenizer, manifest.template, manifest.image, eos_token_id=special.eos_token_id,
                    bos_token_id=special.bos_token_id,
                    visual_tokens=visual_tokens if isinstance(visual_tokens, int) else 0)
