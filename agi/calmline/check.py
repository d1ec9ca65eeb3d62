"""`calmline check`: find an admin's mistakes before the agents do.

Each problem is one line naming the key and the fix; the caller decides the exit status.
"""

from __future__ import annotations

import argparse
import socket

from calmline.config import Config


def _check_port(cfg: Config) -> tuple[list[str], list[str]]:
    host, port = cfg.server.host, cfg.server.port
    try:
        with socket.create_connection((host, port), timeout=2):
            return [], [f"the service answers on {host}:{port}"]
    except OSError as exc:
        return [
            f"server.port: nothing answers on {host}:{port} ({exc.strerror or exc}); "
            f"start it with `calmline serve`, or pass --no-port to skip this check"
        ], []


def run_checks(cfg: Config, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Return (problems, notes) for everything that can be checked from here."""
    problems: list[str] = []
    notes: list[str] = ["config is valid"]
    if not getattr(args, "no_port", False):
        more, ok = _check_port(cfg)
        problems += more
        notes += ok
    return problems, notes
