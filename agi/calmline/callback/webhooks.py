"""Webhooks: the durable outbox of escalation alerts, and the worker that POSTs them.

An escalation commits one row per `[alert] urls` entry in the store before anything is sent,
so the call never waits for a receiver. The worker claims due rows (SKIP LOCKED on PostgreSQL,
so several instances never send the same row at once), POSTs the JSON body with an
`X-Calmline-Signature: sha256=<hex>` HMAC over the exact body and an `Idempotency-Key`, and on
any failure retries with exponential backoff until `[alert] max_attempts`. Delivery is at least
once: a receiver that answered 2xx but whose answer was lost gets the same body and key again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from calmline.config import AlertConfig
from calmline.callback.mail import sanitize_line
from calmline.callback.outbox import text_table, when_text
from calmline.callback.worker import DeliveryWorker
from calmline.store import SharedTable

log = structlog.get_logger("calmline.callback.webhooks")

SIGNATURE_HEADER = "X-Calmline-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
STATUSES: tuple[str, ...] = ("pending", "sent", "failed")


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: `sha256=` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does: compare in constant time."""
    return hmac.compare_digest(sign(secret, body), header or "")


@dataclass(frozen=True, slots=True)
class Webhook:
    """One POST to one URL."""

    id: int
    key: str
    url: str
    status: str
    attempts: int
    next_attempt: float
    last_error: str | None
    http_status: int | None
    queued_at: float
    sent_at: float | None
    body: str


_COLUMNS = "id, key, url, status, attempts, next_attempt, last_error, http_status, queued_at, sent_at, body"


def backoff(attempts: int, cfg: AlertConfig) -> float:
    exponent = min(max(attempts - 1, 0), 62)
    return min(cfg.retry_initial_seconds * (2.0**exponent), cfg.retry_max_seconds)


class WebhookOutbox(SharedTable):
    """The `webhooks` table of the store; thread-safe, shared by every process that opens it."""

    what = "webhook outbox"

    def add(self, key: str, urls: list[str], payload: dict[str, Any], *, linkedid: str = "",
            now: float | None = None) -> int:
        """Queue the alert for each URL; a (key, URL) already queued is not queued again.

        Returns how many rows were added (0 for a replayed escalation).
        """
        queued_at = time.time() if now is None else now
        body = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        added = 0
        with self._tx() as db:
            for url in dict.fromkeys(urls):
                if db.execute("SELECT 1 FROM webhooks WHERE key = ? AND url = ?", (key, url)).fetchone():
                    continue
                db.execute(
                    "INSERT INTO webhooks (key, url, linkedid, status, attempts, next_attempt, "
                    "queued_at, body) VALUES (?, ?, ?, 'pending', 0, 0, ?, ?)",
                    (key, url, linkedid, queued_at, body),
                )
                added += 1
        return added

    @property
    def _skip_locked(self) -> str:
        return " FOR UPDATE SKIP LOCKED" if self.db.kind == "postgresql" else ""

    def due(self, now: float, limit: int = 20, *, claim_for: float | None = None) -> list[Webhook]:
        """Pending rows due at `now`, oldest first; with `claim_for`, pushed that far into the
        future in the same transaction so no other worker takes them meanwhile."""
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM webhooks WHERE status = 'pending' AND next_attempt <= ? "
                "ORDER BY next_attempt, id LIMIT ?" + self._skip_locked,
                (now, limit),
            ).fetchall()
            if claim_for is not None and rows:
                db.executemany("UPDATE webhooks SET next_attempt = ? WHERE id = ?",
                               [(now + claim_for, row[0]) for row in rows])
        return [Webhook(*row) for row in rows]

    def next_due(self) -> float | None:
        with self._read() as db:
            row = db.execute("SELECT MIN(next_attempt) FROM webhooks WHERE status = 'pending'").fetchone()
        return row[0]

    def mark_sent(self, item: Webhook, http_status: int, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE webhooks SET status = 'sent', attempts = attempts + 1, sent_at = ?, "
                "http_status = ?, last_error = NULL WHERE id = ?",
                (now, http_status, item.id),
            )

    def mark_retry(self, item: Webhook, error: str, http_status: int | None, now: float,
                   cfg: AlertConfig) -> Webhook:
        """Record a failed attempt: retry after backoff, or `failed` after `max_attempts`."""
        with self._tx() as db:
            row = db.execute("SELECT attempts, status FROM webhooks WHERE id = ?", (item.id,)).fetchone()
            attempts = row[0] + 1
            if row[1] == "sent":
                pass  # another worker delivered it meanwhile
            elif attempts >= cfg.max_attempts:
                db.execute("UPDATE webhooks SET status = 'failed', attempts = ?, last_error = ?, "
                           "http_status = ? WHERE id = ?", (attempts, error, http_status, item.id))
            else:
                db.execute("UPDATE webhooks SET attempts = ?, last_error = ?, http_status = ?, "
                           "next_attempt = ? WHERE id = ?",
                           (attempts, error, http_status, now + backoff(attempts, cfg), item.id))
            updated = db.execute(f"SELECT {_COLUMNS} FROM webhooks WHERE id = ?", (item.id,)).fetchone()
        return Webhook(*updated)

    def retry_now(self) -> int:
        """Make every pending and failed webhook due now (a failed one gets one more attempt
        before it counts as failed again); how many changed."""
        with self._tx() as db:
            changed = db.execute("UPDATE webhooks SET status = 'pending', next_attempt = 0 "
                                 "WHERE status IN ('pending', 'failed')").rowcount
        return int(changed or 0)

    def unsent(self) -> list[Webhook]:
        """The pending and failed webhooks, oldest first."""
        with self._read() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM webhooks WHERE status IN ('pending', 'failed') "
                              "ORDER BY id").fetchall()
        return [Webhook(*row) for row in rows]

    def items(self) -> list[Webhook]:
        with self._read() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM webhooks ORDER BY id").fetchall()
        return [Webhook(*row) for row in rows]

    def counts(self) -> dict[str, int]:
        with self._read() as db:
            rows = db.execute("SELECT status, COUNT(*) FROM webhooks GROUP BY status").fetchall()
        out = dict.fromkeys(STATUSES, 0)
        out.update(dict(rows))
        return out


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is a failure to retry, never a re-POST of a signed body somewhere else."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401 - urllib's hook
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


class DeliveryError(Exception):
    def __init__(self, message: str, http_status: int | None = None):
        super().__init__(message)
        self.http_status = http_status


def post(item: Webhook, cfg: AlertConfig) -> int:
    """POST one webhook; return the HTTP status (2xx), or raise DeliveryError."""
    secret = cfg.resolved_secret()
    if secret is None:
        raise DeliveryError(f"alert.secret_env: {cfg.secret_env} is not set in calmline's environment; "
                            f"set it (the receiver checks the signature with the same secret)")
    body = item.body.encode("utf-8")
    request = urllib.request.Request(item.url, data=body, method="POST", headers={
        "Content-Type": "application/json",
        "User-Agent": "calmline-webhook",
        SIGNATURE_HEADER: sign(secret, body),
        IDEMPOTENCY_HEADER: item.key,
    })
    try:
        with _OPENER.open(request, timeout=cfg.timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"HTTP {exc.code} from {item.url}", exc.code) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeliveryError(f"cannot POST to {item.url}: {reason}") from None
    if not 200 <= status < 300:
        raise DeliveryError(f"HTTP {status} from {item.url}", status)
    return status


class WebhookWorker(DeliveryWorker[Webhook]):
    """Delivers due webhooks in the background, one at a time, in a thread."""

    kind = "webhook"

    def __init__(self, outbox: WebhookOutbox, cfg: AlertConfig, *,
                 clock: Callable[[], float] = time.time, max_sleep: float = 30.0):
        # A claim outlives the longest POST (its timeout), with room to record the result.
        super().__init__(outbox, cfg, claim_seconds=cfg.timeout * 2 + 30, clock=clock, max_sleep=max_sleep)

    def _deliver(self, item: Webhook) -> bool:
        try:
            status = post(item, self.cfg)
        except DeliveryError as exc:
            when = self._clock()
            updated = self.outbox.mark_retry(item, str(exc), exc.http_status, when, self.cfg)
            if updated.status == "failed":
                log.error("webhook_gave_up", key=item.key, url=item.url, attempts=updated.attempts,
                          error=str(exc))
            else:
                log.warning("webhook_failed", key=item.key, url=item.url, attempt=updated.attempts,
                            error=str(exc), next_attempt_in=round(max(updated.next_attempt - when, 0.0), 3))
            return False
        self.outbox.mark_sent(item, status, self._clock())
        log.info("webhook_sent", key=item.key, url=item.url, attempt=item.attempts + 1, http_status=status)
        return True


def webhooks_report(outbox: WebhookOutbox) -> str:
    """`calmline outbox`'s table of live alerts not yet delivered ("" when there never was one)."""
    counts = outbox.counts()
    if not any(counts.values()):
        return ""
    items = outbox.unsent()
    if not items:
        return f"webhooks: none waiting ({counts['sent']} sent)"
    now = time.time()
    lines = text_table(("KEY", "URL", "STATUS", "ATTEMPTS", "NEXT ATTEMPT", "LAST ERROR"), [
        (sanitize_line(item.key, 40), sanitize_line(item.url, 60), item.status, str(item.attempts),
         when_text(item.next_attempt, now) if item.status == "pending" else "-",
         sanitize_line(item.last_error or "", 80) or "-")
        for item in items
    ])
    return "\n".join(["webhooks:", *lines, "",
                      f"{counts['pending']} pending, {counts['failed']} failed, {counts['sent']} sent"])
