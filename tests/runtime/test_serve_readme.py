"""The README's moe-serve blocks, run as written (port and export directory swapped): the server command line
in a child process over the tiny export, the Python client example and the curl example against it."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openai")

from rt_helpers import build_tiny_export  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def block(marker: str) -> str:
    """The fenced block right after <!-- marker -->."""
    match = re.search(rf"<!-- {marker} -->\n```\w+\n(.*?)```", README, re.S)
    assert match, f"README lost its {marker} block"
    return match.group(1)


def serve_command_line() -> list[str]:
    line = next(line for line in README.splitlines() if line.startswith("moe-serve --engine-dir"))
    return shlex.split(line)[1:]


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory):
    export = tmp_path_factory.mktemp("demo-onnx")
    build_tiny_export(export, np.float32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [str(export) if a == "out/demo-onnx" else str(port) if a == "8000" else a for a in serve_command_line()]
    server = subprocess.Popen([sys.executable, "-c", "import sys, cli; sys.exit(cli.serve_main())", *args,
                               "--model-name", "demo-onnx"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "moe-serve did not start"
                time.sleep(0.1)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_readme_python_client_example(readme_server):
    code = block("serve-python").replace(":8000/", f":{readme_server}/")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()


def test_readme_curl_example(readme_server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    command = block("serve-curl").replace(":8000/", f":{readme_server}/")
    run = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=60)
    answer = json.loads(run.stdout)
    assert answer["object"] == "chat.completion" and answer["choices"][0]["finish_reason"] in ("stop", "length")
