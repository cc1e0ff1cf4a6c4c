"""`moe-export --target tensorrt`: an ONNX export directory -> TensorRT engines, in a new export directory.

  --model DIR      export_onnx (--moe-impl plugin by default) --+
  --from-onnx DIR  an existing ONNX export (no torch, no onnx) --+--> per part: parse (plugin loaded), strongly
                                                                      typed, optimisation profiles, timing cache,
                                                                      workspace limit -> <part>.engine
  OUT/ = the ONNX export (hard links where the filesystem allows) + vision/projector/embed/decoder.engine
         + libmoe_llava_plugin.so (for plugin graphs) + manifest.json with an `engines` section.

TensorRT is imported before anything else, so without it nothing is read or written. OUT is assembled next to
itself and renamed into place at the end: a failed build leaves nothing behind. Precision comes from the graph
(strongly typed networks; TensorRT 11 has no precision flags): fp16 engines are built from an fp16 export;
--precision int4 with the plugin lowering exports INT4 weight-only graphs (export/int4_export.py), int8 / fp8 (and
int4 with other lowerings) ModelOpt Q/DQ graphs.
Supports TensorRT 10.3 (JetPack 6) to 11.x; version differences are guarded where the API changed.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from runtime.errors import UserError
from runtime.manifest import MANIFEST_FILE, PARTS, Manifest
from runtime.tensorrt.cuda import detect_gpu
from runtime.tensorrt.engine_set import ENGINES_FORMAT, ENGINES_KEY, EngineSet
from runtime.tensorrt.libraries import PLUGIN_ENV, PLUGIN_LIBRARY, init_builtin_plugins, load_plugin, trt_logger
from runtime.tensorrt.libraries import import_tensorrt as runtime_import_tensorrt
from runtime.tensorrt.memory import KVMode

from .boards import gpu_family, parse_board
from .output_dir import check_target, staged_output
from .tensorrt_kv_append import APPENDED_FILE, onnx_source, prepare_append_graph
from .tensorrt_checks import (GpuTarget, check_moe_impl, check_precision, check_tensorrt_version, parse_version,
                              resolve_gpu)
from .tensorrt_profiles import BuildLimits, Profile, plan_profiles
from .tensorrt_trtexec import format_command, trtexec_command

MOE_IMPLS = ("auto", "ort", "plugin", "portable")
QUANTISED = ("int8", "int4", "fp8")
# (model, stage dir, MoE lowering, precision, vision tower, plugins=[...]) -> a quantised ONNX export in stage
QuantisedWriter = Callable[..., None]


@dataclass(frozen=True)
class BuildSettings:
    limits: BuildLimits
    gpu: GpuTarget
    plugin: Path | None = None  # libmoe_llava_plugin.so, for graphs with MoELlavaMoE nodes
    workspace_mb: int | None = None
    timing_cache: Path | None = None
    kv_mode: KVMode = KVMode.CONCAT  # APPEND: the decoder engine is built from tensorrt_kv_append's graph


def import_tensorrt():
    return runtime_import_tensorrt("use --target onnx here (e.g. --target onnx --moe-impl plugin) and build the "
                                   "engines on the device with --target tensorrt --from-onnx DIR")


def export_tensorrt(model: str | Path | None = None, from_onnx: str | Path | None = None,
                    out: str | Path | None = None, moe_impl: str = "auto", precision: str | None = None,
                    plugin: str | Path | None = None, gpu: str = "auto", max_batch: int = 1, max_seq: int = 2048,
                    workspace_mb: int | None = None, timing_cache: str | Path | None = None,
                    vision_tower: str | None = None, write_quantised: QuantisedWriter | None = None,
                    group_size: int = 128) -> Path:
    """Build TensorRT engines from `model` (a checkpoint dir or 'demo') or `from_onnx` into `out`.
    A quantised `precision` from a checkpoint needs `write_quantised` (the calibration layer passes it:
    calibration.tensorrt_quantised.export_tensorrt_quantised), so export never imports calibration."""
    trt = import_tensorrt()
    check_tensorrt_version(trt.__version__)
    out = _check_request(model, from_onnx, out, moe_impl, workspace_mb)
    limits = BuildLimits(max_batch, max_seq)
    source = Manifest.load(from_onnx) if from_onnx else None
    _check_attention(source)
    impl = _resolve_impl(moe_impl, source)
    check_moe_impl(impl)
    target = resolve_gpu(gpu_family(gpu), *(detect_gpu() or (None, "")))
    graph_precision = source.precision if source else (precision or "fp32")
    check_precision(graph_precision, target)
    _check_memory(model, source, gpu, graph_precision, max_seq, max_batch, group_size, impl, workspace_mb)
    _note_precision(precision, graph_precision, source)
    settings = BuildSettings(limits, target, find_plugin(plugin) if impl == "plugin" else None, workspace_mb,
                             Path(timing_cache) if timing_cache else None)
    with staged_output(out) as stage:
        if source is not None:
            link_export(source.root, stage)
        else:
            _export_checkpoint(model, stage, impl, graph_precision, vision_tower, settings.plugin, write_quantised)
        plan, settings = build_into(trt, stage, settings)
    print_trtexec(out, Manifest.load(out), plan, settings)
    return out


def build_into(trt, stage: Path, settings: BuildSettings) -> tuple[dict[str, tuple[Profile, ...]], BuildSettings]:
    """Engines for the ONNX export in `stage`, written next to it, and its manifest extended."""
    manifest = Manifest.load(stage)
    settings = replace(settings, limits=_fit_limits(settings.limits, manifest), kv_mode=_kv_append_graph(manifest))
    plan = plan_profiles(manifest, settings.limits, settings.kv_mode)
    write_manifest(stage, build_engines(trt, manifest, plan, settings), trt.__version__)
    return plan, settings


# ---- requests and sources -----------------------------------------------------------------------
def _check_request(model, from_onnx, out, moe_impl: str | None, workspace_mb: int | None) -> Path:
    if out is None:
        raise UserError("--out is required")
    if bool(model) == bool(from_onnx):
        raise UserError("give either --model (export, then build) or --from-onnx DIR (build from an ONNX export)")
    if (moe_impl or "auto") not in MOE_IMPLS:
        raise UserError(f"--moe-impl {moe_impl!r}: expected one of {MOE_IMPLS}")
    if workspace_mb is not None and workspace_mb < 1:
        raise UserError(f"--workspace-mb must be at least 1, got {workspace_mb}")
    out = Path(out)
    check_target(out)
    return out


def _check_memory(model, source: Manifest | None, gpu: str, precision: str, max_seq: int, max_batch: int,
                  group_size: int, impl: str, workspace_mb: int | None) -> None:
    """The memory plan's checks (the model fits a --gpu board; the plugin's workspace fits --workspace-mb),
    imported only when asked for: they read the model config through moe_llava.config."""
    board = parse_board(gpu)
    if board is None and not (impl == "plugin" and workspace_mb):
        return
    from .memory_report import build_config, check_build_memory
    seq = min(max_seq, source.decoder.max_positions) if source else max_seq
    check_build_memory(build_config(model, source.config if source else None), board, precision, seq, max_batch,
                       group_size, impl == "plugin", workspace_mb)


def _kv_append_graph(manifest: Manifest) -> KVMode:
    problem = prepare_append_graph(manifest)
    if problem:
        _note(f"decoder KV cache kept in two device copies: {problem}")
    return KVMode.CONCAT if problem else KVMode.APPEND


def _fit_limits(limits: BuildLimits, manifest: Manifest) -> BuildLimits:
    fitted = limits.fit(manifest.decoder)
    if fitted != limits:
        _note(f"--max-seq {limits.max_seq} is more than the model's {fitted.max_seq} positions: "
              f"the engines take {fitted.max_seq}")
    return fitted


def _check_attention(source: Manifest | None) -> None:
    if source is not None and source.attention == "fused":
        raise UserError(f"{source.root} carries com.microsoft.GroupQueryAttention (--attention fused), an "
                        "onnxruntime op TensorRT cannot parse; re-export it with --attention unfused")


def _resolve_impl(moe_impl: str | None, source: Manifest | None) -> str:
    """The lowering the engines get: the ONNX export's own, or --moe-impl resolved for TensorRT."""
    requested = moe_impl or "auto"
    if source is None:
        from .moe_lowering import MoEImpl  # torch: the checkpoint path needs it anyway
        return MoEImpl(requested).resolve("tensorrt").value
    if requested not in ("auto", source.moe_impl):
        raise UserError(f"--moe-impl {requested} but {source.root} was exported with --moe-impl "
                        f"{source.moe_impl}; re-export it with --target onnx --moe-impl {requested}")
    return source.moe_impl


def _export_checkpoint(model, stage: Path, impl: str, precision: str, vision_tower, plugin: Path | None,
                       write_quantised: QuantisedWriter | None) -> None:
    """The ONNX export (validated against PyTorch) straight into the staging directory."""
    from .moe_lowering import MoEImpl
    if precision in QUANTISED:  # TensorRT takes ModelOpt Q/DQ graphs (QMoE / MatMulNBits are onnxruntime ops)
        if write_quantised is None:
            raise UserError(f"--precision {precision} from a checkpoint is built by calibration.tensorrt_quantised "
                            "(moe-export does that); or quantise elsewhere and build with --from-onnx")
        write_quantised(model, stage, impl, precision, vision_tower, plugins=[str(plugin)] if plugin else None)
        return
    from .attention_lowering import AttentionImpl
    from .onnx_export import export_onnx
    # standard-op attention: TensorRT's builder fuses it into its own attention kernels (README, "Attention")
    export_onnx(model, stage, MoEImpl(impl), precision, vision_tower, validate=True,
                attention=AttentionImpl.UNFUSED)


def link_export(source: Path, stage: Path) -> None:
    """Stage an ONNX export: hard links (no extra disk on an eMMC Jetson) or copies across filesystems.
    manifest.json is copied, never linked, because it is rewritten; old engines and plugin copies are left out."""
    stage.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(source).iterdir()):
        if not f.is_file() or f.suffix == ".engine" or f.name in (PLUGIN_LIBRARY, APPENDED_FILE):
            continue
        if f.name == MANIFEST_FILE:
            shutil.copyfile(f, stage / f.name)
            continue
        try:
            os.link(f, stage / f.name)
        except OSError:
            shutil.copy2(f, stage / f.name)


def find_plugin(explicit: str | Path | None = None) -> Path:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise UserError(f"--plugin {path}: no such file; build it with runtime/plugins/build.sh")
        return path
    candidates = plugin_candidates()
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise UserError(f"the decoder has MoELlavaMoE plugin nodes but {PLUGIN_LIBRARY} was not found (looked at "
                        f"{', '.join(map(str, candidates))}); build it here with runtime/plugins/build.sh "
                        "-DCMAKE_CUDA_ARCHITECTURES=87 (Orin) and pass --plugin PATH, or export --moe-impl portable")
    return found


def plugin_candidates() -> list[Path]:
    """$MOE_LLAVA_PLUGIN, then the CMake build dir and the package dir of runtime/plugins."""
    import runtime
    plugins = Path(runtime.__file__).resolve().parent / "plugins"
    env = os.environ.get(PLUGIN_ENV)
    return ([Path(env)] if env else []) + [plugins / "build" / PLUGIN_LIBRARY, plugins / PLUGIN_LIBRARY]


# ---- building -----------------------------------------------------------------------------------
def network_flags(trt) -> int:
    """Strongly typed (precision from the graph). TensorRT 11 always is, and ignores the flag."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None or parse_version(trt.__version__)[0] >= 11:
        return 0
    return 1 << int(flag)


def build_engines(trt, manifest: Manifest, plan: dict[str, tuple[Profile, ...]],
                  settings: BuildSettings) -> dict[str, Any]:
    """All four engines into manifest.root; returns the manifest's `engines` section."""
    init_builtin_plugins(trt)
    if settings.plugin is not None:
        load_plugin(trt, settings.plugin)  # before parsing: the parser maps MoELlavaMoE nodes to its creator
    cache = TimingCache(settings.timing_cache)
    parts = {}
    for part in PARTS:
        _note(f"building {part}.engine ({len(plan[part])} profile(s)) from {manifest.parts[part].file}")
        engine = build_engine(trt, manifest, part, plan[part], settings, cache)
        with open(manifest.root / f"{part}.engine", "wb") as f:
            f.write(engine)
        del engine  # host memory is GPU memory on a Jetson: drop each plan once written
        parts[part] = {"file": f"{part}.engine", "profiles": [p.to_dict() for p in plan[part]]}
    cache.save()
    if settings.plugin is not None:
        shutil.copy2(settings.plugin, manifest.root / PLUGIN_LIBRARY)
    return engines_section(trt.__version__, parts, settings)


def build_engine(trt, manifest: Manifest, part: str, profiles: tuple[Profile, ...], settings: BuildSettings,
                 cache: TimingCache):
    """Parse <part>.onnx and build its serialised engine (an IHostMemory)."""
    logger = trt_logger(trt)
    onnx_path = onnx_source(manifest, part, settings.kv_mode)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weights (.data) resolve
        raise UserError(f"{onnx_path}: TensorRT's ONNX parser failed: {_parser_error(parser)}")
    check_network_inputs(part, [network.get_input(i).name for i in range(network.num_inputs)], manifest)
    config = builder.create_builder_config()
    if settings.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    cache.attach(config)
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, r in profile.shapes.items():
            trt_profile.set_shape(name, r.min, r.opt, r.max)
        if config.add_optimization_profile(trt_profile) < 0:
            raise UserError(f"{part}: TensorRT refused profile {profile.name!r} ({logger.last_error()})")
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise UserError(f"{part}: TensorRT could not build the engine ({logger.last_error()}); the trtexec line "
                        f"printed by a successful build, or trtexec --onnx={onnx_path} --verbose, shows more")
    return engine


def check_network_inputs(part: str, names: list[str], manifest: Manifest) -> None:
    want = {t.name for t in manifest.parts[part].inputs}
    if set(names) != want:
        raise UserError(f"{manifest.path(part)}: TensorRT sees inputs {sorted(names)}, the manifest declares "
                        f"{sorted(want)}; re-run moe-export --target onnx")


def _parser_error(parser) -> str:
    if not parser.num_errors:
        return "no error reported"
    error = parser.get_error(0)
    node = getattr(error, "node_name", lambda: "")() or error.node()
    more = f" (+{parser.num_errors - 1} more)" if parser.num_errors > 1 else ""
    return f"{error.desc()} at node {node!r}{more}"


class TimingCache:
    """One timing cache shared by the four builds; loaded from and saved to --timing-cache when given."""

    def __init__(self, path: Path | None):
        self.path, self.cache = path, None

    def attach(self, config) -> None:
        if self.cache is None:
            data = self.path.read_bytes() if self.path is not None and self.path.is_file() else b""
            self.cache = config.create_timing_cache(data)
        if not config.set_timing_cache(self.cache, False):
            _note(f"timing cache {self.path} does not match this GPU/TensorRT; starting a new one")
            self.cache = config.create_timing_cache(b"")
            config.set_timing_cache(self.cache, False)

    def save(self) -> None:
        if self.path is None or self.cache is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "wb") as f:
            f.write(self.cache.serialize())
        os.replace(partial, self.path)


# ---- manifest and output ------------------------------------------------------------------------
def engines_section(tensorrt_version: str, parts: dict[str, Any], settings: BuildSettings) -> dict[str, Any]:
    gpu = settings.gpu
    return {
        "format": ENGINES_FORMAT, "tensorrt_version": tensorrt_version, "parts": parts,
        "plugin": PLUGIN_LIBRARY if settings.plugin is not None else None,
        "gpu": {"family": gpu.family, "name": gpu.name,
                "compute_capability": f"{gpu.sm[0]}.{gpu.sm[1]}" if gpu.measured and gpu.sm else None},
        "max_batch": settings.limits.max_batch, "max_seq": settings.limits.max_seq,
        "workspace_mb": settings.workspace_mb, "kv_mode": settings.kv_mode.value,
    }


def write_manifest(directory: Path, section: dict[str, Any], tensorrt_version: str) -> None:
    """The ONNX manifest plus the engines section; read back through the runtime's own loaders."""
    path = directory / MANIFEST_FILE
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw[ENGINES_KEY] = section
    raw.setdefault("versions", {})["tensorrt"] = tensorrt_version
    path.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    EngineSet.load(Manifest.load(directory)).check_files(directory / PLUGIN_LIBRARY if section["plugin"] else None)


def print_trtexec(out: Path, manifest: Manifest, plan: dict[str, tuple[Profile, ...]],
                  settings: BuildSettings) -> None:
    print("equivalent trtexec commands (to rebuild or tune an engine by hand):")
    for part in PARTS:
        source = out / onnx_source(manifest, part, settings.kv_mode).name
        argv = trtexec_command(source, out / f"{part}.engine", plan[part],
                               out / PLUGIN_LIBRARY if settings.plugin is not None else None,
                               settings.workspace_mb, settings.timing_cache)
        print(f"  {format_command(argv)}")


def _note_precision(requested: str | None, graph: str, source: Manifest | None) -> None:
    if source is not None and requested not in (None, "fp32", graph):
        _note(f"--precision {requested} ignored: engines keep the ONNX graph's precision ({graph}); "
              f"re-export with --target onnx --precision {requested} to change it")
    elif source is None and graph == "fp32":
        _note("fp32 graph -> fp32 engines (strongly typed); --precision fp16 halves memory and runs fast on Jetson")


def _note(message: str) -> None:
    print(f"moe-export: {message}", file=sys.stderr, flush=True)
