"""`moe-export --target onnx`: checkpoint -> export directory (four graphs, tokenizer, manifest, validation).

The directory is assembled in a sibling temp dir and renamed into place only after validation passed,
so a failed export leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from tqdm import tqdm

from moe_llava.loading import LoadedModel, checkpoint_digest, load_pretrained
from moe_llava.upcast import compute_dtype
from runtime.errors import UserError
from runtime.manifest import DecoderSpec, Manifest, PartSpec, SpecialTokens, TensorSpec

from .output_dir import check_target, staged_output
from . import attention_lowering
from .attention_lowering import AttentionImpl, swap_in_export_attention
from .moe_lowering import ExportMoE, MoEImpl, drop_scatter_reduction, swap_in_export_moe, translation_table
from .precision import Precision
from .parts import DecoderPart, EmbedPart, ProjectorPart, VisionPart, decoder_io_names, decoder_sample, kv_geometry

OPSET = 18
# Graphs with more weights than this keep them in a .data file. Far below protobuf's 2 GB limit on purpose:
# an inline graph is serialised (and read back by part_spec) as whole in-memory copies, ~3x its weights.
EXTERNAL_DATA_BYTES = 64 << 20


def export_onnx(model: str | Path, out: str | Path, moe_impl: MoEImpl = MoEImpl.AUTO,
                precision: Precision = Precision.FP32, vision_tower: str | None = None,
                validate: bool = True, attention: AttentionImpl = AttentionImpl.AUTO) -> Path:
    """Export `model` (a checkpoint dir or 'demo') into `out`; returns `out`."""
    out = Path(out)
    check_target(out)
    impl = MoEImpl(moe_impl).resolve("onnx")
    attention = AttentionImpl(attention).resolve(impl.value)
    precision = Precision(precision)
    if precision.quantised:
        raise UserError(f"--precision {precision.value} is quantised by calibration.quantize.export_quantized "
                        "(moe-export does that); export_onnx writes fp32 or fp16")
    loaded = load_pretrained(model, vision_tower, dtype=precision.dtype)  # held once, in the export dtype
    with staged_output(out) as staging:
        write_export(loaded, staging, impl, precision, attention)
        if validate:
            from .validate import validate_export
            validate_export(loaded, staging)
    return out


def write_export(loaded: LoadedModel, directory: Path, impl: MoEImpl, precision: Precision,
                 attention: AttentionImpl = AttentionImpl.AUTO) -> Manifest:
    """Graphs + tokenizer + manifest into `directory` (no validation).

    The graphs are traced from `loaded.model` itself (cast to the export dtype in place if it is not in it
    already), never from a copy: at the released size a second model does not fit next to the first.
    """
    attention = AttentionImpl(attention).resolve(impl.value)
    parts = {}
    steps = [("vision", _export_vision), ("projector", _export_projector), ("embed", _export_embed),
             ("decoder", _export_decoder)]
    with _export_view(loaded.model, impl, precision, attention) as model:
        for name, export_part in tqdm(steps, desc="export", unit="graph"):
            path = directory / f"{name}.onnx"
            export_part(model, path, precision.dtype)
            parts[name] = part_spec(path)
    loaded.tokenizer.save(str(directory / "tokenizer.json"))
    manifest = build_manifest(loaded, directory, parts, impl, precision, attention)
    (directory / "manifest.json").write_text(_json(manifest.to_dict()))
    return manifest


@contextlib.contextmanager
def _export_view(model, impl: MoEImpl, precision: Precision, attention: AttentionImpl):
    """`model` with its MoE layers (and, for fused attention, its attention modules) swapped for the lowerings'
    ops while the graphs are traced, then restored."""
    from moe_llava.moe import MoELayer
    if compute_dtype(model.language_model) != precision.dtype:
        model.to_dtype(precision.dtype)
    model.eval()
    originals = [(parent, name, child) for parent in model.modules()
                 for name, child in parent.named_children() if isinstance(child, MoELayer)]
    attentions = [(layer, layer.self_attn) for layer in model.layers] if attention is AttentionImpl.FUSED else []
    swap_in_export_moe(model, impl)
    model.export_impl = impl
    model.kv_slots = swap_in_export_attention(model.language_model) if attentions else None
    try:
        yield model
    finally:
        for module in model.modules():
            if isinstance(module, ExportMoE):
                module.restore()
        for parent, name, child in originals:
            setattr(parent, name, child)
        for layer, attn in attentions:
            layer.self_attn = attn
        del model.export_impl, model.kv_slots


# ---- the four graphs ----------------------------------------------------------------------------
def _export_vision(model, path: Path, dtype: torch.dtype) -> None:
    size = model.vision_tower.spec.config["image_size"]
    pixels = torch.randn(2, 3, size, size, dtype=dtype)
    _onnx_export(VisionPart(model), (pixels,), path, ["pixel_values"], ["image_features"],
                 ({0: torch.export.Dim("images")},))


def _export_projector(model, path: Path, dtype: torch.dtype) -> None:
    features = torch.randn(2, 5, model.config.mm_hidden_size, dtype=dtype)
    _onnx_export(ProjectorPart(model), (features,), path, ["image_features"], ["image_embeds"],
                 ({0: torch.export.Dim("images"), 1: torch.export.Dim("image_tokens")},))


def _export_embed(model, path: Path, dtype: torch.dtype) -> None:
    ids = torch.tensor([[1, 2, 3]])
    _onnx_export(EmbedPart(model), (ids,), path, ["input_ids"], ["inputs_embeds"],
                 ({0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")},))


def _export_decoder(model, path: Path, dtype: torch.dtype) -> None:
    args, shapes = decoder_sample(model, dtype)
    inputs, outputs = decoder_io_names(model.config.num_layers)
    translations = translation_table(model.export_impl)
    if getattr(model, "kv_slots", None) is not None:
        translations.update(attention_lowering.translation_table())
    _onnx_export(DecoderPart(model), args, path, inputs, outputs, shapes, translations)


def _onnx_export(module, args, path: Path, input_names, output_names, dynamic_shapes, translations=None):
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    weights += sum(b.numel() * b.element_size() for b in module.buffers())
    with _quiet(), torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=OPSET,
                                    input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, custom_translation_table=translations,
                                    verbose=False, optimize=True)
    drop_scatter_reduction(program.model)  # portable MoE: TensorRT's parser refuses even reduction="none"
    _save(program.model, path, weights)
    _release()


def _save(model, path: Path, weights: int) -> None:
    """The graph, its weights in `<name>.onnx.data` when over EXTERNAL_DATA_BYTES (protobuf stops at 2 GB)."""
    import onnx_ir as ir
    if weights <= EXTERNAL_DATA_BYTES:
        ir.save(model, str(path))
        return
    with tqdm(total=weights, desc=f"writing {path.name} weights", unit="B", unit_scale=True, leave=False) as bar:
        ir.save(model, str(path), external_data=f"{path.name}.data",
                callback=lambda tensor, _info: bar.update(tensor.nbytes))


def _release() -> None:
    """onnxscript's default rewrite rules are module-level objects whose matchers keep the last graph they
    matched (SimplePatternMatcher._graph / _current_node / _match), and through its constants the traced model's
    tensors: the weights would outlive the model (12.8 GB at the released size in fp32). Forget it."""
    from onnxscript import rewriter
    for rule in getattr(rewriter, "_DEFAULT_REWRITE_RULES", ()):
        matcher = getattr(rule, "_matcher", None)
        for attribute in ("_graph", "_current_node", "_tracer"):
            if hasattr(matcher, attribute):
                setattr(matcher, attribute, None)
        if hasattr(matcher, "_match"):  # the last match's bound nodes and values
            matcher._match = type(matcher._match)()


@contextlib.contextmanager
def _quiet():
    """The exporter narrates every step on stdout; keep the CLI's own progress bar readable."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# ---- manifest -----------------------------------------------------------------------------------
_ONNX_TO_NUMPY = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                  onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}


def part_spec(path: Path) -> PartSpec:
    """I/O names, shapes and dtypes as the saved graph declares them."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def tensors(values):
        specs = []
        for v in values:
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                    for d in v.type.tensor_type.shape.dim]
            specs.append(TensorSpec(v.name, tuple(dims), _ONNX_TO_NUMPY[v.type.tensor_type.elem_type]))
        return tuple(specs)
    return PartSpec(path.name, tensors(graph.input), tensors(graph.output))


def build_manifest(loaded: LoadedModel, directory: Path, parts: dict[str, PartSpec], impl: MoEImpl,
                   precision: Precision, attention: AttentionImpl = AttentionImpl.UNFUSED) -> Manifest:
    model, config = loaded.model, loaded.config
    kv_heads, head_dim = kv_geometry(model)
    decoder = DecoderSpec(num_layers=config.num_layers, num_kv_heads=kv_heads, head_dim=head_dim,
                          hidden_size=config.hidden_size, vocab_size=config.vocab_size,
                          max_positions=int(model.backbone.context_length(config.backbone)))
    return Manifest(root=directory, format_version=1, model_type=config.model_type, config=config.to_dict(),
                    precision=precision.value, moe_impl=impl.value, attention=attention.value,
                    template=loaded.template,
                    tokenizer="tokenizer.json",
                    special_tokens=SpecialTokens(loaded.bos_token_id, loaded.eos_token_id,
                                                 config.backbone.get("pad_token_id")),
                    image=loaded.image_processor.spec, decoder=decoder, parts=parts,
                    source={"path": str(loaded.directory), "sha256": checkpoint_digest(loaded.directory)},
                    versions=_versions())


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import transformers

    from runtime.ort_engine import import_onnxruntime
    onnxruntime = import_onnxruntime()  # one-line error without an ONNX Runtime package
    return {"moe-llava-edge": version("moe-llava-edge"), "torch": torch.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": str(OPSET)}


def _json(d: dict) -> str:
    import json
    return json.dumps(d, indent=2) + "\n"
