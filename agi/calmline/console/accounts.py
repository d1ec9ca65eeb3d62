"""Supervisors' accounts in the store: scrypt-hashed passwords, and the failed logins that
slow a name down and then lock it for a while (shared by every console on the store)."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from calmline.store import Database

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 10
# scrypt's cost: 16 MiB and ~50 ms per guess on one core.
_N, _R, _P = 2**14, 8, 1
# Checked against when the name is unknown, so that a miss costs what a hit costs.
_DUMMY = f"scrypt${_N}${_R}${_P}${'00' * 16}${'00' * 32}"


class AccountError(ValueError):
    """A name or password the console will not take, said in one line."""


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, maxmem=64 << 20, dklen=32)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${key.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=128 << 20, dklen=len(key) // 2)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), key)


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise AccountError(f"{name!r} is not an account name: 1-64 letters, digits and . _ @ -, "
                           "starting with a letter or digit")
    return name


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    locked_for: float = 0.0  # seconds the name stays locked (refused even with the right password)
    failures: int = 0  # failed logins in a row, after this one


class Accounts:
    def __init__(self, db: Database, *, lockout_after: int = 5, lockout_minutes: float = 15.0):
        self.db = db
        self.lockout_after = lockout_after
        self.lockout_seconds = lockout_minutes * 60

    def add(self, name: str, password: str, *, replace: bool = False) -> bool:
        """Create the account (or, with `replace`, set its password); False if it existed."""
        check_name(name)
        if len(password) < MIN_PASSWORD:
            raise AccountError(f"the password is shorter than {MIN_PASSWORD} characters")
        hashed = hash_password(password)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        conn = self.db.connect()
        try:
            with conn.transaction():
                exists = conn.execute("SELECT 1 FROM console_users WHERE name = ?", (name,)).fetchone()
                if exists and not replace:
                    return False
                if exists:
                    conn.execute("UPDATE console_users SET password_hash = ? WHERE name = ?", (hashed, name))
                else:
                    conn.execute("INSERT INTO console_users (name, password_hash, created_at) VALUES (?, ?, ?)",
                                 (name, hashed, now))
                conn.execute("DELETE FROM console_failures WHERE name = ?", (name.lower(),))
        finally:
            conn.close()
        return True

    def remove(self, name: str) -> bool:
        conn = self.db.connect()
        try:
            with conn.transaction():
                return conn.execute("DELETE FROM console_users WHERE name = ?", (name,)).rowcount > 0
        finally:
            conn.close()

    def exists(self, name: str) -> bool:
        conn = self.db.connect()
        try:
            return conn.execute("SELECT 1 FROM console_users WHERE name = ?", (name,)).fetchone() is not None
        finally:
            conn.close()

    def names(self) -> list[str]:
        conn = self.db.connect()
        try:
            return [r[0] for r in conn.execute("SELECT name FROM console_users ORDER BY name").fetchall()]
        finally:
            conn.close()

    def login(self, name: str, password: str, now: float | None = None) -> Verdict:
        """Check a login; count a failure, lock the name after `lockout_after` in a row."""
        now = time.time() if now is None else now
        key = (name or "")[:64].lower()
        conn = self.db.connect()
        try:
            row = conn.execute("SELECT failures, last_at, locked_until FROM console_failures WHERE name = ?",
                               (key,)).fetchone()
            failures = 0
            if row is not None:
                failures, last_at, locked_until = int(row[0]), float(row[1]), float(row[2])
                if locked_until > now:
                    check_password(password, _DUMMY)
                    return Verdict(False, locked_for=locked_until - now, failures=failures)
                if now - last_at > self.lockout_seconds:
                    failures = 0  # an old run of failures is forgiven
            found = conn.execute("SELECT password_hash FROM console_users WHERE name = ?",
                                 (name,)).fetchone() if NAME.match(name or "") else None
            ok = check_password(password, found[0] if found else _DUMMY) and found is not None
            with conn.transaction():
                if ok:
                    conn.execute("DELETE FROM console_failures WHERE name = ?", (key,))
                    return Verdict(True)
                failures += 1
                locked = now + self.lockout_seconds if failures >= self.lockout_after else 0.0
                conn.execute("INSERT INTO console_failures (name, failures, last_at, locked_until) "
                             "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET failures = excluded.failures, "
                             "last_at = excluded.last_at, locked_until = excluded.locked_until",
                             (key, failures, now, locked))
            return Verdict(False, locked_for=max(0.0, locked - now), failures=failures)
        finally:
            conn.close()
