"""`hermes-pipeline serve`: the exported model in llama.cpp's server, with tools, the way users run it.

Starts ``llama-server --jinja`` on a run's GGUF (or a GGUF file), checks that it parses tool calls with
the same probe the export verification uses, prints the URL and what llama.cpp detected, and serves until
interrupted. A Vision model's GGUF is served with the mmproj file beside it (``--mmproj``), and takes
pictures instead of tools. The server listens on loopback unless ``--host`` says otherwise.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

from hermes_pipeline.errors import UserError
from hermes_pipeline.llama_server import LOG_CHAT_FORMAT, LOOPBACK, MMPROJ_PREFIX, find_mmproj, running_server
from hermes_pipeline.merge.server_check import ServerReport, check_props, check_tool_calls

# The file served from a folder when --type is not given: near-lossless first, then the reference.
PREFERRED_TYPES = ("Q8_0", "f16", "bf16", "f32")


def find_gguf(target: Path, gguf_type: str | None = None) -> Path:
    """The GGUF to serve: ``target`` itself, or one in ``target`` or ``target/gguf`` (a run directory)."""
    if target.is_file():
        return target
    folder = target / "gguf" if (target / "gguf").is_dir() else target
    files = (
        sorted(p for p in folder.glob("*.gguf") if not p.name.startswith(MMPROJ_PREFIX))
        if folder.is_dir()
        else []
    )
    if not files:
        raise UserError(
            f"{target}: no GGUF file here or in {target / 'gguf'}; export one first (hermes-pipeline run)"
        )
    by_type = {path.stem.rsplit("-", 1)[-1].lower(): path for path in files}
    if gguf_type is not None:
        if gguf_type.lower() not in by_type:
            raise UserError(f"{folder}: no {gguf_type} file; there are: {', '.join(p.name for p in files)}")
        return by_type[gguf_type.lower()]
    return next((by_type[t.lower()] for t in PREFERRED_TYPES if t.lower() in by_type), files[0])


def serve(
    target: Path,
    host: str = LOOPBACK,
    port: int = 8080,
    context: int = 4096,
    gguf_type: str | None = None,
    extra: list[str] | None = None,
    log: Callable[[str], None] = print,
    until: Callable[[], object] | None = None,
) -> ServerReport:
    """Serve until interrupted (or until ``until()`` returns, for tests); returns what was detected."""
    log = partial(log, flush=True) if log is print else log
    gguf = find_gguf(target, gguf_type)
    mmproj = find_mmproj(gguf)
    extra = [*(["--mmproj", str(mmproj)] if mmproj else []), *(extra or [])]
    log_path = Path(tempfile.mkdtemp(prefix="hermes-serve-")) / "llama-server.log"
    log(f"serve: starting llama-server on {gguf}{f' with {mmproj.name}' if mmproj else ''} (log: {log_path})")
    with running_server(gguf, host, port, context, [*LOG_CHAT_FORMAT, *extra], log_path) as server:
        report = ServerReport()
        if mmproj is None:
            check_props(server, None, {}, report)
            check_tool_calls(server, report)
        elif not server.get("/props").get("modalities", {}).get("vision"):
            report.problems.append(f"llama-server loaded {mmproj.name} without vision")
        if report.problems:
            raise UserError(f"serve: {gguf.name}: " + "; ".join(report.problems))
        log(f"serve: {server.url}/v1 (OpenAI-compatible: POST {server.url}/v1/chat/completions)")
        if mmproj:
            log(
                "serve: pictures: an image_url part, then the text starting with a newline (LLaVA's "
                "'<image>\\n'); the server joins parts with nothing between them"
            )
        else:
            log(
                f"serve: tool calls: <tool_call> JSON blocks, parsed by llama.cpp into message.tool_calls "
                f"(chat format {report.tool_call_format}; parallel calls "
                f"{'supported' if report.supports_parallel_tool_calls else 'not supported'})"
            )
        log("serve: Ctrl-C stops the server")
        try:
            until() if until else server.process.wait()
        except KeyboardInterrupt:
            log("serve: stopping")
    return report
