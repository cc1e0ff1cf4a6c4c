"""Image URLs of a chat request -> the image file's bytes: data: URLs, local files under one directory,
http(s) only when enabled and then with size and time limits. Decoding (and Pillow's decompression-bomb
limit) happens in the pipeline, which raises UserError for a broken or non-image file."""
from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from runtime.errors import UserError


@dataclass(frozen=True)
class ImagePolicy:
    root: Path | None = None  # local files are served only from under it; None: no local files
    allow_http: bool = False
    max_bytes: int = 20 * 2**20
    http_timeout_s: float = 10.0


def read_image_url(url: str, policy: ImagePolicy) -> bytes:
    if url.startswith("data:"):
        return decode_data_url(url, policy.max_bytes)
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return download(url, policy)
    if scheme in ("file", ""):
        return read_local(unquote(urlsplit(url).path) if scheme == "file" else url, policy)
    raise UserError(f"unsupported image URL scheme {scheme!r}; send a data: URL, a file under the server's "
                    "--image-root, or http(s) where the server allows it")


def decode_data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise UserError("an image data: URL must look like data:image/png;base64,<base64 data>")
    if len(payload) * 3 // 4 > max_bytes:
        raise UserError(f"the image is larger than the server's limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise UserError(f"the image data: URL is not valid base64 ({e})") from None


def read_local(path: str, policy: ImagePolicy) -> bytes:
    if policy.root is None:
        raise UserError("local image files are off; start moe-serve with --image-root DIR or send a data: URL")
    root = policy.root.resolve()
    resolved = (root / path).resolve()  # an absolute path replaces root; symlinks and '..' are followed first
    if not resolved.is_relative_to(root):
        raise UserError(f"image path {path!r} is outside the server's --image-root")
    if not resolved.is_file():
        raise UserError(f"image file {path!r} not found under the server's --image-root")
    if resolved.stat().st_size > policy.max_bytes:
        raise UserError(f"the image is larger than the server's limit of {policy.max_bytes} bytes")
    return resolved.read_bytes()


def download(url: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_http:
        raise UserError("http(s) image URLs are off; start moe-serve with --allow-http-images or send a data: URL")
    try:
        with urllib.request.urlopen(url, timeout=policy.http_timeout_s) as response:
            data = response.read(policy.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UserError(f"cannot fetch image {url!r}: {getattr(e, 'reason', e)}") from None
    if len(data) > policy.max_bytes:
        raise UserError(f"the image at {url!r} is larger than the server's limit of {policy.max_bytes} bytes")
    return data
