"""The durable outbox of callback requests: written first, mailed later, never lost.

Delivery is at least once: when the SMTP server accepted a message but its answer (or our
marking the row sent) was lost, the message is sent again, with the same Message-ID, so a
receiving mail system or reader can tell the copies apart.

When an agent ends an abusive call, the session builds a `CallbackRequest` and calls
`Outbox.add`. That commits (in the store, beside the audit trail) one row per message to send: the
team's callback mail, and the caller's follow-up mail when the channel gave a usable address.
The mail worker (`calmline.callback.mail.OutboxWorker`) delivers due rows and marks them sent, or
schedules a retry with exponential backoff; after `mail.max_attempts` a row is `failed` and
waits for an admin (`calmline outbox`, `retry_now`).

Idempotency: `(key, kind)` is unique, and `key` is chosen by the caller per call (e.g. the
linkedid), so a second key press or a replay after a crash adds nothing. Several processes
may open the same store (the service, the CLI, other instances): a worker *claims* a row
before sending it (`due(..., claim_for=...)`, with SKIP LOCKED on PostgreSQL), so two workers
do not send the same row at the same time. Delivery is at least once: if the SMTP server
accepts a message and the reply is lost, it is sent again, with the same Message-ID.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Literal

import structlog
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from calmline.config import MailConfig
from calmline.store import DATABASE_ERRORS, SharedTable

log = structlog.get_logger("calmline.callback.outbox")

Kind = Literal["team", "caller"]
Status = Literal["pending", "sent", "failed"]
STATUSES: tuple[str, ...] = ("pending", "sent", "failed")

_TEXT_LIMIT = 512
_KEY_LIMIT = 255
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _plain_text(value: object) -> object:
    """Make a str storable: lone surrogates (undecodable caller bytes) become U+FFFD; cap length.

    The raw text is otherwise kept as the caller sent it (control characters and all): it is
    evidence. Whatever writes it somewhere sensitive (a mail header) sanitizes it there.
    """
    if not isinstance(value, str):
        return value
    return _SURROGATE.sub("\ufffd", value)[:_TEXT_LIMIT]


def _key(value: str) -> str:
    if not value or len(value) > _KEY_LIMIT or _CONTROL.search(value) or _SURROGATE.search(value):
        raise ValueError(f"key must be 1-{_KEY_LIMIT} characters without control characters")
    return value


Text = Annotated[str, BeforeValidator(_plain_text)]


class CallbackRequest(BaseModel):
    """What the team needs to call a customer back after an agent ended the call."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: Annotated[str, AfterValidator(_key)]
    created_at: datetime
    caller_number: Text
    caller_name: Text
    caller_email: Text | None = None
    agent: Text
    warnings: int = Field(ge=0)
    reason: Text
    uniqueid: Text
    linkedid: Text
    channel: Text

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("created_at must be timezone-aware (UTC)")
        return value.astimezone(timezone.utc)


# --- the caller's address -------------------------------------------------

# A practical, strict subset of RFC 5321: dot-atom local part (RFC 5322 atext without "?",
# so no RFC 2047 encoded word can hide in it) and an ASCII domain with at least one dot.
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=^_`{|}~-]+)*$")
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def caller_address(value: str | None) -> str:
    """The caller's e-mail address, stripped; ValueError (saying why) when it is not usable.

    Usable means exactly one plain ASCII address such as `name@example.com`: no display
    name, no list, no comments, no spaces or control characters.
    """
    if value is None or not value.strip():
        raise ValueError("no e-mail address on the channel")
    address = value.strip()
    if len(address) > 254:
        raise ValueError("address is longer than 254 characters")
    if not address.isascii():
        raise ValueError("address has non-ASCII characters")
    if address.count("@") != 1:
        raise ValueError("not a single address (needs exactly one @)")
    local, domain = address.split("@")
    if not local or len(local) > 64 or not _LOCAL.match(local):
        raise ValueError("the part before @ is not a plain mailbox name")
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        raise ValueError("the part after @ is not a domain name such as example.com")
    return address


# --- rows ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One message in the outbox; `recipient` is None for team mail (sent to `mail.team_address`)."""

    id: int
    key: str
    kind: Kind
    status: Status
    attempts: int
    next_attempt: float
    last_error: str | None
    smtp_reply: str | None
    queued_at: float
    sent_at: float | None
    recipient: str | None
    request: CallbackRequest


_COLUMNS = (
    "id, key, kind, status, attempts, next_attempt, last_error, smtp_reply, "
    "queued_at, sent_at, recipient, request"
)


def _item(row: tuple) -> OutboxItem:
    (id_, key, kind, status, attempts, next_attempt, last_error, smtp_reply,
     queued_at, sent_at, recipient, request) = row
    return OutboxItem(
        id=id_,
        key=key,
        kind=kind,
        status=status,
        attempts=attempts,
        next_attempt=next_attempt,
        last_error=last_error,
        smtp_reply=smtp_reply,
        queued_at=queued_at,
        sent_at=sent_at,
        recipient=recipient,
        request=CallbackRequest.model_validate_json(request),
    )


def backoff(attempts: int, cfg: MailConfig) -> float:
    """Seconds to wait after the `attempts`-th failed attempt: initial, doubling, capped."""
    exponent = min(max(attempts - 1, 0), 62)
    return min(cfg.retry_initial_seconds * (2.0**exponent), cfg.retry_max_seconds)


def _reconnecting(method):
    """Run once more on a new connection when the old one turned out dead (the database restarted
    since its last use): each method is one transaction, so nothing half-done is repeated."""

    @functools.wraps(method)
    def run(self: Outbox, *args, **kwargs):
        with self._lock:
            fresh = self._db is None
            try:
                return method(self, *args, **kwargs)
            except DATABASE_ERRORS:
                if fresh or self._db is not None:
                    raise  # not a stale connection: the error is the database's answer now
                return method(self, *args, **kwargs)

    return run


class Outbox(SharedTable):
    """The outbox table of the store; thread-safe, and shared by every process that opens it."""

    what = "outbox"

    # --- queueing ---

    @_reconnecting
    def add(self, request: CallbackRequest, *, now: float | None = None) -> bool:
        """Queue the team mail (and the caller mail when the address is usable).

        Returns False, adding nothing, when a request with this key is already queued
        (whatever its status): one callback request per key, ever.
        """
        queued_at = time.time() if now is None else now
        payload = request.model_dump_json()
        recipient: str | None = None
        skipped: str | None = None
        try:
            recipient = caller_address(request.caller_email)
        except ValueError as exc:
            skipped = str(exc)
        with self._tx() as db:
            taken = db.execute("SELECT 1 FROM outbox WHERE key = ? LIMIT 1", (request.key,)).fetchone()
            if taken:
                log.info("callback_duplicate", key=request.key, uniqueid=request.uniqueid,
                         linkedid=request.linkedid)
                return False
            rows = [("team", None)]
            if recipient is not None:
                rows.append(("caller", recipient))
            for kind, to in rows:
                db.execute(
                    "INSERT INTO outbox (key, kind, recipient, linkedid, status, attempts, "
                    "next_attempt, queued_at, request) VALUES (?, ?, ?, ?, 'pending', 0, 0, ?, ?)",
                    (request.key, kind, to, request.linkedid, queued_at, payload),
                )
        log.info(
            "callback_queued",
            key=request.key,
            uniqueid=request.uniqueid,
            linkedid=request.linkedid,
            agent=request.agent,
            warnings=request.warnings,
            messages=[kind for kind, _ in rows],
        )
        if skipped is not None:
            log.info("caller_mail_skipped", key=request.key, linkedid=request.linkedid, reason=skipped)
        return True

    # --- delivery bookkeeping ---

    @property
    def _skip_locked(self) -> str:
        """On PostgreSQL, rows another worker is claiming right now are passed over."""
        return " FOR UPDATE SKIP LOCKED" if self.db.kind == "postgresql" else ""

    @_reconnecting
    def due(self, now: float, limit: int = 50, *, claim_for: float | None = None) -> list[OutboxItem]:
        """Pending messages whose next attempt is at or before `now`, oldest first.

        With `claim_for`, the returned rows are pushed `claim_for` seconds into the future in
        the same transaction, so another worker (another process) does not pick them up while
        this one sends; a worker that dies mid-send leaves them due again after the claim.
        """
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE status = 'pending' AND next_attempt <= ? "
                "ORDER BY next_attempt, id LIMIT ?" + self._skip_locked,
                (now, limit),
            ).fetchall()
            if claim_for is not None and rows:
                db.executemany(
                    "UPDATE outbox SET next_attempt = ? WHERE id = ?",
                    [(now + claim_for, row[0]) for row in rows],
                )
        return [_item(row) for row in rows]

    @_reconnecting
    def next_due(self) -> float | None:
        """The earliest next attempt among pending messages, or None when none is pending."""
        with self._read() as db:
            row = db.execute(
                "SELECT MIN(next_attempt) FROM outbox WHERE status = 'pending'"
            ).fetchone()
        return row[0]

    @_reconnecting
    def mark_sent(self, item: OutboxItem, reply: str, now: float) -> None:
        """Record that the SMTP server accepted the message at `now`, with its reply to DATA."""
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET status = 'sent', attempts = attempts + 1, sent_at = ?, "
                "smtp_reply = ?, last_error = NULL WHERE id = ?",
                (now, reply, item.id),
            )

    @_reconnecting
    def mark_retry(self, item: OutboxItem, error: str, now: float, cfg: MailConfig) -> OutboxItem:
        """Record a failed attempt: retry after backoff, or `failed` after `cfg.max_attempts`.

        Returns the row as stored now (its `status` says whether it gave up).
        """
        with self._tx() as db:
            row = db.execute("SELECT attempts, status FROM outbox WHERE id = ?", (item.id,)).fetchone()
            if row is None:
                raise KeyError(f"outbox row {item.id} ({item.key}/{item.kind}) is gone")
            attempts = row[0] + 1
            if row[1] == "sent":
                pass  # another worker delivered it meanwhile; keep that
            elif attempts >= cfg.max_attempts:
                db.execute(
                    "UPDATE outbox SET status = 'failed', attempts = ?, last_error = ? WHERE id = ?",
                    (attempts, error, item.id),
                )
            else:
                db.execute(
                    "UPDATE outbox SET attempts = ?, last_error = ?, next_attempt = ? WHERE id = ?",
                    (attempts, error, now + backoff(attempts, cfg), item.id),
                )
            updated = db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?", (item.id,)).fetchone()
        return _item(updated)

    # --- inspection and admin ---

    @_reconnecting
    def items(self) -> list[OutboxItem]:
        """All messages, in the order they were queued."""
        with self._read() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM outbox ORDER BY id").fetchall()
        return [_item(row) for row in rows]

    @_reconnecting
    def retry_now(self) -> int:
        """Make every pending and failed message due now.

        Failed ones become pending again and keep their attempt count, so each gets one more
        attempt before it counts as failed again. Returns how many messages were changed.
        """
        with self._tx() as db:
            changed = db.execute(
                "UPDATE outbox SET status = 'pending', next_attempt = 0 "
                "WHERE status IN ('pending', 'failed')"
            ).rowcount
        log.info("outbox_retry_now", messages=changed)
        return changed

    @_reconnecting
    def counts(self) -> dict[str, int]:
        """Number of messages per status (every status present, 0 when none)."""
        with self._read() as db:
            rows = db.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status").fetchall()
        out = dict.fromkeys(STATUSES, 0)
        out.update(dict(rows))
        return out


__all__ = [
    "CallbackRequest",
    "Outbox",
    "OutboxItem",
    "backoff",
    "caller_address",
    "STATUSES",
]


# --- what `calmline outbox` prints -------------------------------------------------------


def when_text(epoch: float | None, now: float) -> str:
    """A next attempt as an admin reads it: `now`, or the UTC time."""
    if epoch is None:
        return "-"
    if epoch <= now:
        return "now"
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns as wide as their widest cell (cells already sanitised)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
