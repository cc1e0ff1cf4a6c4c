"""Checkpoint directory <-> model: `load_pretrained` (official MoE-LLaVA dirs, ours, `demo`) and `save_pretrained`.

We write the official layout (config.json with the `moe` dict, `deepspeed_moe` keys, sharded safetensors),
so a checkpoint trained here loads in the reference code and vice versa.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.errors import UserError
from runtime.prompt import END_OF_TEXT, Template, template_for

from .checkpoint import ours_to_official, write_state_dict
from .config import MoELlavaConfig
from .image_processing import HFImageProcessor
from .model import MoELlavaForCausalLM
from .qwen import TIKTOKEN_FILE, tokenizer_from_tiktoken
from .vision import VisionTower, load_tower_weights, resolve_tower
from .weight_files import WeightFiles

DEMO_DIR = Path(__file__).parent / "assets" / "demo"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "qwen.tiktoken")


@dataclass
class LoadedModel:
    model: MoELlavaForCausalLM
    tokenizer: object                  # tokenizers.Tokenizer
    image_processor: HFImageProcessor
    directory: Path
    eos_token_id: int
    bos_token_id: int | None

    @property
    def config(self) -> MoELlavaConfig:
        return self.model.config

    @property
    def template(self) -> Template:
        return template_for(self.config.model_type)


def resolve_model_dir(name: str | Path) -> Path:
    if str(name) == "demo":
        if not (DEMO_DIR / "config.json").is_file():
            raise UserError("the embedded demo model is missing; build it with `moe-train --recipe demo "
                            f"--out {DEMO_DIR}`")
        return DEMO_DIR
    directory = Path(name).expanduser()
    if not directory.is_dir():
        raise UserError(f"model directory {directory} does not exist; pass a MoE-LLaVA checkpoint dir or 'demo'")
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} has no config.json; pass a MoE-LLaVA checkpoint directory")
    return directory


def build_model(config: MoELlavaConfig, vision_tower: str | None = None, checkpoint_dir: Path | None = None):
    """A model with fresh weights, plus the local tower directory it should load (None = embedded)."""
    name = vision_tower or config.mm_image_tower
    spec, tower_dir = resolve_tower(name, checkpoint_dir, config.image_tower_config,
                                    config.image_processor_config)
    if spec.config.get("hidden_size") != config.mm_hidden_size:
        raise UserError(f"vision tower {name!r} has width {spec.config.get('hidden_size')} but the checkpoint's "
                        f"mm_hidden_size is {config.mm_hidden_size}; pass the matching --vision-tower")
    return MoELlavaForCausalLM(config, spec), tower_dir


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(choice: str | torch.dtype, stored: torch.dtype) -> torch.dtype:
    """`--dtype`: auto = fp32 on CPU (fast kernels, exact reference), the checkpoint's own dtype on CUDA."""
    if isinstance(choice, torch.dtype):
        return choice
    if choice == "auto":
        return stored if torch.cuda.is_available() else torch.float32
    if choice not in DTYPES:
        raise UserError(f"--dtype {choice!r} unknown; use auto, {', '.join(DTYPES)}")
    return DTYPES[choice]


def load_pretrained(name: str | Path, vision_tower: str | None = None,
                    dtype: str | torch.dtype = "auto", keep_stored: bool = False) -> LoadedModel:
    """Built with meta parameters, then filled tensor by tensor from the files in the compute dtype.

    keep_stored: weights stay in the checkpoint's own 16-bit dtype and are cast to `dtype` as each layer runs
    (upcast.py): the same outputs as a `dtype` load in the memory of the files (validation references)."""
    from .materialise import materialise, parameters_on_meta
    from .upcast import compute_in
    directory = resolve_model_dir(name)
    config = MoELlavaConfig.from_json(directory / "config.json")
    with WeightFiles(directory) as files:
        dtype = resolve_dtype(dtype, files.stored_dtype())
        storage = files.stored_dtype() if keep_stored and files.stored_dtype().itemsize < dtype.itemsize else dtype
        with parameters_on_meta():
            model, tower_dir = build_model(config, vision_tower, directory)
        if tower_dir is not None:  # a separate tower directory: small, built and loaded the plain way
            model.vision_tower = VisionTower(model.vision_tower.spec, config.mm_vision_select_layer,
                                             config.mm_vision_select_feature)
            load_tower_weights(model.vision_tower, tower_dir)
        materialise(model, files, storage, tower_from_checkpoint=tower_dir is None)
    if storage == dtype:
        model.to_dtype(dtype)
    else:  # buffers (rotary frequencies) stay as built, in fp32
        compute_in(model, dtype)
    model.eval()
    tokenizer = load_tokenizer(directory)
    processor = HFImageProcessor(model.vision_tower.spec.processor, config.image_aspect_ratio)
    eos, bos = special_token_ids(config, tokenizer)
    return LoadedModel(model, tokenizer, processor, directory, eos, bos)


def load_tokenizer(directory: Path):
    """`tokenizers.Tokenizer` from tokenizer.json, else converted: Qwen-1's qwen.tiktoken by us (its tokenizer
    class is remote code), other slow files by transformers. Conversion happens in memory at every load; an
    export writes the result as tokenizer.json, so the runtime never converts."""
    from tokenizers import Tokenizer
    if (directory / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(directory / "tokenizer.json"))
    if (directory / TIKTOKEN_FILE).is_file():
        return tokenizer_from_tiktoken(directory / TIKTOKEN_FILE)
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(directory), use_fast=True).backend_tokenizer
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise UserError(f"no usable tokenizer in {directory} ({type(e).__name__}); add a tokenizer.json") from None


def special_token_ids(config: MoELlavaConfig, tokenizer) -> tuple[int, int | None]:
    eos = config.backbone.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is None:
        eos = tokenizer.token_to_id(END_OF_TEXT)
    if eos is None:
        raise UserError("cannot tell the end token: set eos_token_id in config.json")
    return int(eos), config.backbone.get("bos_token_id")


def save_pretrained(model: MoELlavaForCausalLM, directory: str | Path, tokenizer_dir: Path | None = None,
                    max_shard_bytes: int = 2 << 30, state_dict: dict | None = None) -> Path:
    """Write config.json + official-layout safetensors (+ tokenizer files) into `directory`. `state_dict`
    replaces the model's own (a sharded trainer's gathered full state)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.copy()
    spec = model.vision_tower.spec
    if config.mm_image_tower not in _known_tower_ids() and config.image_tower_config is None:
        config.image_tower_config, config.image_processor_config = dict(spec.config), dict(spec.processor)
    config.save(directory)
    state = model.state_dict() if state_dict is None else state_dict
    write_state_dict(ours_to_official(state, model.backbone), directory, max_shard_bytes)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file() and Path(tokenizer_dir).resolve() != directory.resolve():
                shutil.copy(Path(tokenizer_dir) / name, directory / name)
    return directory


def _known_tower_ids() -> set[str]:
    from .vision import KNOWN_TOWERS
    return set(KNOWN_TOWERS)


def checkpoint_digest(directory: Path) -> str:
    """A short content hash of config + weight files (recorded in export manifests)."""
    import hashlib
    h = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.suffix in (".json", ".safetensors", ".bin"):
            h.update(path.name.encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def describe(loaded: LoadedModel) -> dict:
    cfg = loaded.config
    return {"model_type": cfg.model_type, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
            "moe_layers": cfg.moe_layers, "experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k,
            "directory": str(loaded.directory), "config": json.loads(json.dumps(cfg.to_dict()))}
