"""Runs an Argo CD health script (`health.lua`) on an object under a real Lua 5.1
interpreter, the way Argo CD does: the object is the global `obj`, the script returns a
table with `status` and `message`. (Argo CD embeds gopher-lua, a Lua 5.1.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HEALTH_DIR = REPO / "config" / "argocd" / "resource_customizations" / "parley.dev"


def lua_interpreter() -> str:
    lua = shutil.which("lua5.1")
    if lua is None:
        raise AssertionError("lua5.1 is not installed: `apt-get install lua5.1` (make test installs it)")
    return lua


def to_lua(value: Any) -> str:
    """A Lua literal for a JSON-like value (null fields are left out, as Argo CD does)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = "".join(
            c if c.isalnum() or c in " _-.:/,;()[]{}'@#=+*<>!?%$&|~^`" else f"\\{ord(c):03d}" for c in value
        )
        return f'"{escaped}"'
    if isinstance(value, list):
        return "{" + ", ".join(to_lua(v) for v in value) + "}"
    if isinstance(value, dict):
        fields = (f"[{to_lua(str(k))}] = {to_lua(v)}" for k, v in value.items() if v is not None)
        return "{" + ", ".join(fields) + "}"
    raise TypeError(f"no Lua literal for {type(value).__name__}")


def health(kind: str, obj: dict) -> tuple[str, str]:
    """(status, message) that `<kind>/health.lua` gives for `obj`."""
    script = HEALTH_DIR / kind / "health.lua"
    program = (
        f"obj = {to_lua(obj)}\n"
        f"local hs = assert(loadfile({to_lua(str(script))}))()\n"
        'io.write(tostring(hs.status), "\\n", tostring(hs.message))\n'
    )
    proc = subprocess.run([lua_interpreter(), "-"], input=program, capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed on {obj.get('metadata', {}).get('name')}: {proc.stderr.strip()}")
    status, _, message = proc.stdout.partition("\n")
    return status, message
