"""`moe-serve`: argument parsing and startup; the server itself is runtime.serve (FastAPI app, worker, images)."""
from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from runtime.errors import UserError

from .run import add_engine_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-serve", description="Serve MoE-LLaVA over the OpenAI chat-completions "
                                "API (POST /v1/chat/completions, GET /v1/models, GET /health).")
    add_engine_flags(p)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime decoder threads (default: all cores)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the model id clients send (default: the directory's name)")
    i = p.add_argument_group("images")
    i.add_argument("--image-root", help="allow image URLs naming local files under this directory")
    i.add_argument("--allow-http-images", action="store_true", help="fetch http(s) image URLs (off by default)")
    i.add_argument("--max-image-mb", type=float, default=20.0, help="largest image file accepted")
    i.add_argument("--http-timeout", type=float, default=10.0, help="seconds allowed for fetching one image")
    q = p.add_argument_group("queue")
    q.add_argument("--max-queue", type=int, default=16, help="requests waiting behind the current one; "
                   "more answer 429")
    q.add_argument("--request-timeout", type=float, default=300.0, help="seconds from arrival to the last "
                   "token; later answers 504")
    return p


def load_serving_pipeline(args: argparse.Namespace):
    from runtime.device import Device, open_runtime
    if args.engine_dir:
        return open_runtime(args.engine_dir, args.backend, Device(args.device), "moe-serve", args.threads)[0]
    try:
        from moe_llava.inference import torch_pipeline
        from moe_llava.torch_device import choose_torch
    except ImportError as e:
        raise UserError(f"--model needs PyTorch ({e.name} is missing): pip install moe-llava-edge[torch], "
                        "or serve an export with --engine-dir") from None
    choice = choose_torch(Device(args.device))
    pipeline = torch_pipeline(args.model, device=choice.device.value)
    choice.announce("moe-serve")
    return pipeline


def check_args(args: argparse.Namespace) -> None:
    if args.image_root and not Path(args.image_root).is_dir():
        raise UserError(f"--image-root {args.image_root!r} is not a directory")
    for flag, value in (("--max-queue", args.max_queue), ("--request-timeout", args.request_timeout),
                        ("--max-image-mb", args.max_image_mb), ("--http-timeout", args.http_timeout)):
        if not value > 0:
            raise UserError(f"{flag} must be > 0, got {value}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")


def main(args: argparse.Namespace) -> int:
    check_args(args)
    try:
        import uvicorn

        from runtime.serve.app import ServerConfig, create_app
        from runtime.serve.images import ImagePolicy
    except ImportError as e:
        raise UserError(f"moe-serve needs {e.name}: pip install moe-llava-edge[serve]") from None
    images = ImagePolicy(root=Path(args.image_root) if args.image_root else None,
                         allow_http=args.allow_http_images, max_bytes=int(args.max_image_mb * 2**20),
                         http_timeout_s=args.http_timeout)
    name = args.model_name or Path(args.engine_dir or args.model).name
    config = ServerConfig(name, images, args.max_queue, args.request_timeout)
    pipeline = load_serving_pipeline(args)
    if not _is_loopback(args.host):
        print(f"warning: listening on {args.host}: the server has no authentication", file=sys.stderr)
    with pipeline:
        uvicorn.run(create_app(pipeline, config), host=args.host, port=args.port, log_level="warning")
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
