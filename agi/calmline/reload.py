"""What a config reload may change, and the fingerprint that tells configs apart.

The running service can swap in a new config for new sessions, but not what it built
once at startup (the socket it listens on, the store it writes): changing those needs a
restart, and a reload that asks for it is refused with the keys named.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from calmline.config import Config

# Dotted keys (or prefixes) bound at startup. A key that does not exist in this version's
# config is simply never changed. Every `listen.*` and `alert.*` key applies on reload: the
# registry is rebuilt with them, and the webhook worker takes the new `[alert]` section.
RESTART_ONLY = (
    "server.host",
    "server.port",
    "store.url",
    "store.password_env",
    "audit.stdout",
    "audit.commit_timeout",
    "mail.enabled",
    "metrics.enabled",
    "metrics.host",
    "metrics.port",
    "cooldown.enabled",
)


def flatten(config: Config) -> dict[str, Any]:
    """Every setting under its dotted key (`warn.stages` is one value, a list)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            out[prefix] = value

    walk("", config.model_dump(mode="json"))
    return out


# Secrets stay out of the fingerprint (it is shown on /metrics and in the trail, and a hash
# of otherwise known settings would let a weak password be guessed offline) and out of
# messages: a changed password changes no fingerprint, only the `changed` keys say so.
_SECRET_KEYS = ("mail.password", "store.password")
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*):[^@/\s]*@")


def shown(key: str, value: Any) -> Any:
    """A setting's value as it may be shown or hashed: secrets masked."""
    if key in _SECRET_KEYS:
        return None if value is None else "(set)"
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\1:***@", value)
    return value


def fingerprint(config: Config) -> str:
    """A stable hash of the validated config, secrets left out: equal configs (however
    written) hash alike."""
    settings = {key: shown(key, value) for key, value in flatten(config).items()}
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def changed_keys(old: Config, new: Config) -> list[str]:
    a, b = flatten(old), flatten(new)
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))


def _restart_only(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESTART_ONLY)


def refusals(old: Config, new: Config, source: str, *, has_outbox: bool = True) -> list[str]:
    """One line per change that needs a restart, naming the key; empty when the swap is safe."""
    a, b = flatten(old), flatten(new)
    lines = [
        f"{source}: {key} cannot change without a restart (running with {shown(key, a.get(key))!r}, "
        f"the file says {shown(key, b.get(key))!r}); put it back, or restart the service "
        f"(systemctl restart calmline)"
        for key in changed_keys(old, new)
        if _restart_only(key)
    ]
    if new.end.enabled and not has_outbox:
        lines.append(
            f"{source}: end.enabled cannot change without a restart (the callback outbox is "
            f"opened at startup); put it back, or restart the service (systemctl restart calmline)"
        )
    return lines
