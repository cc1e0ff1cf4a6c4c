from __future__ import annotations

import json

import pytest

from rt_helpers import build_tiny_export  # noqa: E402
from runtime.errors import UserError  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402
from runtime.preprocess import ImageSpec  # noqa: E402
from runtime.prompt import Template  # noqa: E402


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    build_tiny_export(out)
    return out


def test_loads_typed(export_dir):
    m = Manifest.load(export_dir)
    assert m.template is Template.STABLELM
    assert isinstance(m.image, ImageSpec) and m.image.crop_size == (8, 8)
    assert m.special_tokens.eos_token_id == 256 and m.special_tokens.bos_token_id is None
    assert m.decoder.num_layers == 2 and m.decoder.io_names()[0][3] == "past_key_values.0.key"
    assert m.parts["decoder"].input("inputs_embeds").dtype == "float32"
    assert m.parts["decoder"].input("inputs_embeds").shape == ("B", "S", 8)
    assert m.path("vision") == export_dir / "vision.onnx"
    raw = json.loads((export_dir / "manifest.json").read_text())
    assert m.to_dict() == raw


def broken(export_dir, tmp_path, edit) -> str:
    """Copy of the export with `edit(raw_manifest, dir)` applied; returns the UserError message on load."""
    out = tmp_path / "broken"
    out.mkdir()
    for f in export_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    raw = json.loads((out / "manifest.json").read_text())
    edit(raw, out)
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(UserError) as info:
        Manifest.load(out)
    message = str(info.value)
    assert "\n" not in message
    return message


def _set(path, value):
    def edit(raw, out):
        node = raw
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit, expected", [
    (_set(["format_version"], 2), "format_version 2 is not supported"),
    (_set(["template"], KeyError), "missing keys ['template']"),
    (_set(["parts", "projector"], KeyError), "parts ['projector'] missing"),
    (_set(["parts", "decoder", "file"], "nope.onnx"), "nope.onnx (parts.decoder.file)"),
    (lambda raw, out: (out / "tokenizer.json").unlink(), "tokenizer.json (tokenizer)"),
    (_set(["template"], "llama"), "template 'llama' is not one of"),
    (_set(["parts", "embed", "inputs", 0, "dtype"], "float128"), "dtype 'float128'"),
    (_set(["special_tokens", "image_token_index"], -1), "image_token_index -1"),
    (_set(["decoder", "num_layers"], 3), "missing ['past_key_values.2.key', 'past_key_values.2.value']"),
    (_set(["parts", "vision", "outputs", 0, "name"], "features"), "unexpected ['features']"),
    (_set(["image", "aspect_ratio"], "anyres"), "aspect_ratio 'anyres'"),
    (_set(["decoder", "extra"], 1), "malformed"),
    (_set(["attention"], "flash"), "attention 'flash' is not one of ['unfused', 'fused']"),
    (_set(["kv_cache"], "fp8"), "kv_cache 'fp8' is not one of ['float', 'int8']"),
    (_set(["kv_cache"], "int8"), "an int8 KV cache needs fused attention"),
])
def test_validation_errors_are_one_clear_line(export_dir, tmp_path, edit, expected):
    assert expected in broken(export_dir, tmp_path, edit)


def test_export_without_attention_field_reads_as_unfused(export_dir, tmp_path):
    """Exports written before manifest.attention existed carry the standard-op attention."""
    out = tmp_path / "old"
    out.mkdir()
    for f in export_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    raw = json.loads((out / "manifest.json").read_text())
    del raw["attention"]
    (out / "manifest.json").write_text(json.dumps(raw))
    assert Manifest.load(out).attention == "unfused" and Manifest.load(export_dir).attention == "unfused"


def test_export_without_kv_cache_field_reads_as_float(export_dir, tmp_path):
    """Exports written before manifest.kv_cache existed keep their cache in the graph's float dtype."""
    out = tmp_path / "old"
    out.mkdir()
    for f in export_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    raw = json.loads((out / "manifest.json").read_text())
    del raw["kv_cache"]
    (out / "manifest.json").write_text(json.dumps(raw))
    assert Manifest.load(out).kv_cache == "float"


def test_missing_directory_and_bad_json(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Manifest.load(tmp_path / "nowhere")
    with pytest.raises(UserError, match="manifest.json: not found"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(UserError, match="not valid JSON"):
        Manifest.load(tmp_path)
