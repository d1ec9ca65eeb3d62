"""Running the console: its cookie-signing key, the audit store it records logins in, uvicorn."""

from __future__ import annotations

import os
import secrets
import socket
import sys
from pathlib import Path

from calmline.config import Config
from calmline.errors import ConfigError
from calmline.store import Database

MIN_SECRET = 32


def secret(cfg: Config) -> str:
    """The key from `console.secret_env`, or from `console.secret_file` (made 0600 if absent)."""
    console = cfg.console
    if console.secret_env:
        value = os.environ.get(console.secret_env, "")
        if len(value) < MIN_SECRET:
            raise ConfigError([f"console.secret_env: the variable {console.secret_env} must hold at least "
                               f"{MIN_SECRET} characters (e.g. `openssl rand -hex 32`)"])
        return value
    path = Path(console.secret_file)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError([f"console.secret_file: cannot create {path}: {exc.strerror}; point it at a "
                           "file in a directory calmline can write, or set console.secret_env"]) from None
    else:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                raise ConfigError([f"console.secret_file: {path} may be read by others; "
                                   f"run `chmod 600 {path}`"])
            value = f.read().strip()
    except OSError as exc:
        raise ConfigError([f"console.secret_file: cannot read {path}: {exc.strerror}"]) from None
    if len(value) < MIN_SECRET:
        raise ConfigError([f"console.secret_file: {path} holds fewer than {MIN_SECRET} characters; "
                           "remove it and calmline makes a new one (everyone logs in again)"])
    return value


def run(cfg: Config, db: Database) -> None:
    try:
        import uvicorn

        from calmline.console.app import create_app
    except ImportError as exc:
        raise ConfigError([f"console: {exc.name} is not installed; run "
                           "`pip install 'calmline[console]'` (Starlette, uvicorn, Jinja2)"]) from None
    from calmline.audit.store import AuditStore, stamp

    key = secret(cfg)
    audit = AuditStore(db)
    audit.open()
    host, port = cfg.console.host, cfg.console.port
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    bound = sock.getsockname()[1]
    app = create_app(cfg, db, key, audit)
    audit.submit(stamp("info", {"event": "console_started", "host": host, "port": bound}))
    shown = f"[{host}]" if ":" in host else host
    print(f"calmline console: listening on http://{shown}:{bound}/ (store {db.where})", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, server_header=False,
                                           proxy_headers=False, lifespan="off", timeout_graceful_shutdown=2))
    try:
        server.run(sockets=[sock])
    finally:
        audit.submit(stamp("info", {"event": "console_stopped"}))
        audit.close()
        sys.stdout.flush()
