"""A model folder's own code runs only when the user opts in.

A Hub folder can name Python classes of its own (``auto_map`` in its config files) or ship ``*.py``
modules; transformers imports them when told to trust remote code, and llama.cpp's converter tells it to
for some tokenizers whatever we pass. So before a tool that may do so reads a folder, ``refuse_custom_code``
names what would run and stops unless the user opted in (``model.trust_remote_code`` in a recipe,
``--trust-remote-code`` for a model folder on the command line).
"""

from __future__ import annotations

import json
from pathlib import Path

from hermes_pipeline.errors import UserError

# The files in which transformers looks for an ``auto_map`` naming a folder's own classes.
CONFIG_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def custom_code(folder: Path) -> str | None:
    """What in ``folder`` names code of its own, in words, or None when nothing does."""
    for name in CONFIG_FILES:
        path = folder / name
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # absent or unreadable: the loader that needs the file reports it
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if auto_map:
            classes = auto_map.values() if isinstance(auto_map, dict) else auto_map
            return f"{name} names its own classes in auto_map ({', '.join(map(str, classes))[:120]})"
    modules = sorted(path.name for path in folder.glob("*.py"))
    if modules:
        return f"it ships Python modules ({', '.join(modules[:3])}{', ...' if len(modules) > 3 else ''})"
    return None


def refuse_custom_code(folder: Path, trusted: bool) -> None:
    """Stop, in one line saying how to opt in, when ``folder`` would run its own code."""
    found = None if trusted else custom_code(folder)
    if found:
        raise UserError(
            f"{folder}: {found}, which would run as code here; if you trust it, set "
            "model.trust_remote_code: true in the recipe (or pass --trust-remote-code with a model folder)"
        )
