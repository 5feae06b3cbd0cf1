"""The chat templates: the two Hermes 2 Pro ships (installed on every prepared tokenizer under their names),
and Vicuna v1, the one template of a Hermes 2 Vision model."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

TEMPLATE_NAMES = ("default", "tool_use")
VICUNA_TEMPLATE = "vicuna_v1"


@cache
def template_source(name: str) -> str:
    """The Jinja source of a named template (``default``, ``tool_use`` or ``vicuna_v1``)."""
    known = (*TEMPLATE_NAMES, VICUNA_TEMPLATE)
    if name not in known:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(known)}")
    return (files("hermes_pipeline.chat_format") / "templates" / f"{name}.jinja").read_text(encoding="utf-8")


def hermes_templates() -> dict[str, str]:
    """Both templates by name. transformers picks ``tool_use`` when ``tools=`` is passed, else ``default``."""
    return {name: template_source(name) for name in TEMPLATE_NAMES}


def install_templates(tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer.chat_template = hermes_templates()


def render(
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
    bos_token: str = "",
    template: str | None = None,
) -> str:
    """Render one conversation as text, exactly as ``tokenizer.apply_chat_template(..., tokenize=False)`` would.

    Picks ``tool_use`` when tools are given, like transformers does. ``template`` overrides the source
    (the golden tests render the published template through this same path).
    """
    source = template or template_source("tool_use" if tools is not None else "default")
    rendered, _ = render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=source,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
    )
    return rendered[0]
