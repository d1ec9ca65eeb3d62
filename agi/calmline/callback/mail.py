"""Callback mail: build the team and caller messages, send them, and drain the outbox.

Everything a caller controls (caller ID name and number can hold any bytes) is sanitized
here, explicitly, before it goes into a header or a body: control characters and line
breaks become spaces, header values are length-limited, and RFC 2047 encoded-word openers
(`=?`) are broken up. The last one matters: Python's `email` package *decodes* encoded words
in a header value assigned as a string, so `=?utf-8?q?a=0D=0ABcc:_x@y?=` would otherwise put
a real `Bcc:` line into the message on Python versions before 3.11.10 / 3.12.5. The SMTP
envelope is always given explicitly, never derived from headers.

Delivery runs in a worker thread (`asyncio.to_thread`), so a slow or dead SMTP server never
blocks a caller's session. Every step is logged on `calmline.callback.mail`.
"""

from __future__ import annotations

import hashlib
import re
import smtplib
import ssl
import string
import time
import unicodedata
from collections.abc import Callable
from datetime import datetime, timezone
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime

import structlog

from calmline.config import MailConfig
from calmline.errors import CalmlineError, ConfigError
from calmline.callback.outbox import CallbackRequest, Outbox, OutboxItem, caller_address, text_table, when_text
from calmline.callback.worker import DeliveryWorker

log = structlog.get_logger("calmline.callback.mail")

HEADER_LIMIT = 200
SUBJECT_LIMIT = 300
BODY_VALUE_LIMIT = 500

#: Placeholders `mail.subject` may use (the team sees everything about the call).
TEAM_FIELDS: tuple[str, ...] = (
    "caller_number",
    "caller_name",
    "caller_email",
    "agent",
    "warnings",
    "reason",
    "time",
    "uniqueid",
    "linkedid",
    "channel",
)
#: Placeholders the caller's mail may use: nothing internal, and not the agent's name.
CALLER_FIELDS: tuple[str, ...] = ("caller_name", "caller_number", "time")

_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_SPACES = re.compile(r"\s+")


class MailError(CalmlineError):
    """Sending failed; `code`/`reply` are the SMTP server's answer when it gave one.

    `permanent` is True for a 5xx answer. The worker still retries every failure (until
    `mail.max_attempts`): a 5xx is often a misconfiguration an admin fixes.
    """

    outcome = "mail_failed"

    def __init__(self, message: str, *, code: int | None = None, reply: str = ""):
        self.code = code
        self.reply = reply
        self.permanent = code is not None and 500 <= code < 600
        super().__init__(message)


# --- sanitizing -----------------------------------------------------------


def _clean_chars(value: str) -> str:
    out = []
    for ch in value:
        category = unicodedata.category(ch)
        if category in ("Cc", "Zl", "Zp") or ch in _BIDI:
            out.append(" ")
        elif category == "Cs":
            out.append("\ufffd")
        else:
            out.append(ch)
    return "".join(out)


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 1].rstrip() + "\u2026"


def sanitize_line(value: object, limit: int = BODY_VALUE_LIMIT) -> str:
    """One line of text for a body field: control characters and line breaks become spaces."""
    text = _SPACES.sub(" ", _clean_chars(str(value))).strip()
    return _truncate(text, limit)


def sanitize_header(value: object, limit: int = HEADER_LIMIT) -> str:
    """A header-safe single line: as `sanitize_line`, and no RFC 2047 encoded word (`=?`)."""
    text = sanitize_line(value, limit=limit * 2)
    text = text.replace("=?", "= ?")
    return _truncate(text, limit)


def sanitize_body(text: str) -> str:
    """A body: newlines (any convention) become \\n, tabs stay, other controls become spaces."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(ch if ch in "\n\t" else _clean_chars(ch) for ch in text)


# --- templates ------------------------------------------------------------


def _utc_time(request: CallbackRequest) -> str:
    return request.created_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _values(request: CallbackRequest, clean: Callable[[object], str]) -> dict[str, object]:
    return {
        "caller_number": clean(request.caller_number),
        "caller_name": clean(request.caller_name),
        "caller_email": clean(request.caller_email or ""),
        "agent": clean(request.agent),
        "warnings": request.warnings,
        "reason": clean(request.reason),
        "time": _utc_time(request),
        "uniqueid": clean(request.uniqueid),
        "linkedid": clean(request.linkedid),
        "channel": clean(request.channel),
    }


_SAMPLE = CallbackRequest(
    key="sample",
    created_at=datetime(2024, 1, 1, tzinfo=timezone.utc),
    caller_number="+15550100",
    caller_name="Sample Caller",
    caller_email="caller@example.com",
    agent="PJSIP/2001",
    warnings=2,
    reason="abusive caller",
    uniqueid="1700000000.1",
    linkedid="1700000000.1",
    channel="PJSIP/trunk-00000001",
)


def _template_problems(key: str, template: str, allowed: tuple[str, ...]) -> list[str]:
    allowed_text = ", ".join("{" + name + "}" for name in allowed)
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        return [f"{key}: not a valid template ({exc}); write {{{{ and }}}} for a literal brace"]
    problems = []
    for _literal, name, spec, conversion in fields:
        if name is None:
            continue
        if name not in allowed:
            shown = "{" + name + "}" if name else "{}"
            problems.append(f"{key}: unknown placeholder {shown}; allowed: {allowed_text}")
        elif spec or conversion:
            # `{caller_name:>50000000}` would build 50 MB per mail: placeholders are plain.
            written = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            problems.append(f"{key}: placeholder {written[:60]} has a format spec or conversion; "
                            f"write it plainly as {{{name}}}")
    if not problems:
        try:
            template.format_map(_values(_SAMPLE, sanitize_line))
        except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
            problems.append(f"{key}: cannot be filled in ({type(exc).__name__}: {exc}); allowed: {allowed_text}")
    return problems


def check_templates(cfg: MailConfig) -> list[str]:
    """Problems in the mail templates, one line each naming the key (empty when all is well)."""
    return (
        _template_problems("mail.subject", cfg.subject, TEAM_FIELDS)
        + _template_problems("mail.caller_subject", cfg.caller_subject, CALLER_FIELDS)
        + _template_problems("mail.caller_template", cfg.caller_template, CALLER_FIELDS)
    )


def _fill(key: str, template: str, allowed: tuple[str, ...], values: dict[str, object]) -> str:
    problems = _template_problems(key, template, allowed)
    if problems:
        raise ConfigError(problems)
    return template.format_map({name: values[name] for name in allowed})


# --- messages -------------------------------------------------------------


def message_id(key: str, kind: str, sender: str) -> str:
    """A Message-ID that is the same for every attempt at the same message."""
    digest = hashlib.sha256(f"{key}\0{kind}".encode("utf-8", "surrogatepass")).hexdigest()[:32]
    domain = re.sub(r"[^A-Za-z0-9.-]", "", sender.rpartition("@")[2]).strip(".") or "calmline.invalid"
    return f"<calmline.{kind}.{digest}@{domain}>"


def _base(request: CallbackRequest, cfg: MailConfig, kind: str, to: str, subject: str) -> EmailMessage:
    message = EmailMessage(policy=SMTP_POLICY)
    message["From"] = cfg.sender
    message["To"] = to
    message["Subject"] = sanitize_header(subject, SUBJECT_LIMIT)
    message["Date"] = format_datetime(request.created_at.astimezone(timezone.utc))
    message["Message-ID"] = message_id(request.key, kind, cfg.sender)
    message["Auto-Submitted"] = "auto-generated"
    return message


def _seal(message: EmailMessage, body: str, expected: set[str]) -> EmailMessage:
    body = sanitize_body(body)
    plain = body.isascii() and all(len(line) <= 78 for line in body.splitlines())
    # Quoted-printable keeps non-ASCII text readable in the raw message (base64 would not).
    message.set_content(body, charset="utf-8", cte=None if plain else "quoted-printable")
    # Last line of defence: every header is one line and nothing unexpected slipped in.
    names = {name.lower() for name in message.keys()}
    extra = names - expected - {"content-type", "content-transfer-encoding", "mime-version"}
    for name, value in message.items():
        if "\r" in str(value) or "\n" in str(value):
            raise MailError(f"refusing to send: header {name} would span lines")
    if extra:
        raise MailError(f"refusing to send: unexpected headers {sorted(extra)}")
    return message


def build_team_message(request: CallbackRequest, cfg: MailConfig) -> EmailMessage:
    """The callback request for the team: every detail of the call, and what to do."""
    header_values = _values(request, sanitize_header)
    subject = _fill("mail.subject", cfg.subject, TEAM_FIELDS, header_values)
    message = _base(request, cfg, "team", cfg.team_address, subject)
    message["X-Calmline-Key"] = sanitize_header(request.key)
    v = _values(request, sanitize_line)
    email_line = str(v["caller_email"]) or "not known"
    if request.caller_email:
        try:
            caller_address(request.caller_email)
            email_line += " (a short follow-up mail was sent to this address)"
        except ValueError as exc:
            email_line += f" (not used: {exc})"
    rows = [
        ("Caller", v["caller_name"] or "(no name given)"),
        ("Number", v["caller_number"] or "(no number given)"),
        ("E-mail", email_line),
        ("Agent", v["agent"]),
        ("Time", v["time"]),
        ("Warnings", f"{request.warnings} given before the call was ended"),
        ("Reason", v["reason"]),
        ("Unique ID", v["uniqueid"]),
        ("Linked ID", v["linkedid"]),
        ("Channel", v["channel"]),
        ("Request", sanitize_line(request.key)),
    ]
    width = max(len(label) for label, _ in rows) + 2
    body = (
        "Callback request\n"
        "================\n\n"
        "An agent ended this call because of the caller's behaviour. The customer\n"
        "still needs an answer to whatever they called about.\n\n"
        + "".join(f"{(label + ':').ljust(width)}{value}\n" for label, value in rows)
        + "\nWhat to do:\n"
        "  Call the customer back when they have had some time to calm down\n"
        "  (for example later today or tomorrow), ideally by someone other than\n"
        "  the agent above. If they gave an e-mail address, you can also answer\n"
        "  in writing.\n\n"
        "-- \ncalmline (automatic message; replies go to the sender address)\n"
    )
    expected = {"from", "to", "subject", "date", "message-id", "auto-submitted", "x-calmline-key"}
    return _seal(message, body, expected)


def build_caller_message(request: CallbackRequest, cfg: MailConfig) -> EmailMessage:
    """The caller's calm follow-up mail; replies go to the team. ValueError without an address."""
    to = caller_address(request.caller_email)
    header_values = _values(request, sanitize_header)
    subject = _fill("mail.caller_subject", cfg.caller_subject, CALLER_FIELDS, header_values)
    body_values = _values(request, sanitize_line)
    if not body_values["caller_name"]:
        body_values["caller_name"] = "customer"
    body = _fill("mail.caller_template", cfg.caller_template, CALLER_FIELDS, body_values)
    message = _base(request, cfg, "caller", to, subject)
    message["Reply-To"] = cfg.team_address
    expected = {"from", "to", "subject", "date", "message-id", "auto-submitted", "reply-to"}
    return _seal(message, body, expected)


def build_message(item: OutboxItem, cfg: MailConfig) -> tuple[EmailMessage, str]:
    """The message for an outbox row and its one envelope recipient."""
    if item.kind == "team":
        return build_team_message(item.request, cfg), cfg.team_address
    message = build_caller_message(item.request, cfg)
    return message, caller_address(item.recipient or item.request.caller_email)


# --- sending --------------------------------------------------------------


def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _text(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return sanitize_line(text, 500)


def _refused(stage: str, code: int, raw: bytes | str) -> MailError:
    text = _text(raw)
    return MailError(f"{stage}: {code} {text}", code=code, reply=text)


def send(message: EmailMessage, cfg: MailConfig, *, recipients: list[str] | None = None) -> str:
    """Send one message (blocking); return the server's reply to DATA, e.g. "250 OK queued".

    The envelope recipients are `recipients`, or else the addresses in the To header; Cc and
    Bcc headers are never used. Raises `MailError` with the SMTP code and text, or the
    connection error.
    """
    if recipients is None:
        to = message["To"]
        recipients = [a.addr_spec for a in getattr(to, "addresses", ())] if to is not None else []
    if not recipients:
        raise MailError("message has no recipient")
    payload = message.as_bytes(policy=SMTP_POLICY)
    where = f"{cfg.host}:{cfg.port}"
    stage = "connect"
    try:
        smtp = smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout)
    except smtplib.SMTPResponseException as exc:
        raise _refused(f"{where} greeting", exc.smtp_code, exc.smtp_error) from None
    except (OSError, smtplib.SMTPException) as exc:
        raise MailError(f"cannot connect to {where}: {exc or type(exc).__name__}") from None
    try:
        stage = "EHLO"
        smtp.ehlo_or_helo_if_needed()
        if cfg.starttls:
            stage = "STARTTLS"
            if not smtp.has_extn("starttls"):
                raise MailError(
                    f"{where} does not offer STARTTLS and mail.starttls = true; not sending in the clear"
                )
            smtp.starttls(context=_tls_context())
            stage = "EHLO after STARTTLS"
            smtp.ehlo()
        if cfg.username:
            stage = "AUTH"
            password = cfg.resolved_password()
            if password is None:
                source = f"environment variable {cfg.password_env}" if cfg.password_env else "mail.password"
                raise MailError(f"mail.username is set but {source} gives no password")
            smtp.login(cfg.username, password)
        stage = "MAIL FROM"
        code, raw = smtp.mail(cfg.sender)
        if code != 250:
            raise _refused(stage, code, raw)
        for recipient in recipients:
            stage = f"RCPT TO <{recipient}>"
            code, raw = smtp.rcpt(recipient)
            if code not in (250, 251):
                raise _refused(stage, code, raw)
        stage = "DATA"
        code, raw = smtp.data(payload)  # returns (not raises) a refusal after the body
        if code != 250:
            raise _refused(stage, code, raw)
        reply = f"{code} {_text(raw)}"
    except MailError:
        smtp.close()
        raise
    except smtplib.SMTPResponseException as exc:
        smtp.close()
        raise _refused(stage, exc.smtp_code, exc.smtp_error) from None
    except (OSError, smtplib.SMTPException) as exc:
        smtp.close()
        raise MailError(f"{stage} to {where} failed: {exc or type(exc).__name__}") from None
    # The message is accepted: a failing QUIT must not turn that into a retry (and a duplicate).
    try:
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        smtp.close()
    return reply


# --- the worker -----------------------------------------------------------


class OutboxWorker(DeliveryWorker[OutboxItem]):
    """Delivers due outbox messages in the background; one message at a time, in a thread."""

    kind = "mail"

    def __init__(self, outbox: Outbox, cfg: MailConfig, *, clock: Callable[[], float] = time.time,
                 max_sleep: float = 30.0):
        # The lease on a claimed mail: if this process dies mid-send, another instance's
        # worker sends it (same Message-ID) once the lease runs out.
        super().__init__(outbox, cfg, claim_seconds=cfg.lease_seconds, clock=clock, max_sleep=max_sleep)

    def _deliver(self, item: OutboxItem) -> bool:
        """Send one claimed message and record the outcome."""
        attempt = item.attempts + 1
        try:
            message, recipient = build_message(item, self.cfg)
            reply = send(message, self.cfg, recipients=[recipient])
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the others
            error = str(exc) if isinstance(exc, (MailError, ConfigError)) else f"{type(exc).__name__}: {exc}"
            when = self._clock()
            updated = self.outbox.mark_retry(item, error, when, self.cfg)
            code = getattr(exc, "code", None)
            if updated.status == "failed":
                log.error(
                    "mail_gave_up",
                    key=item.key,
                    linkedid=item.request.linkedid,
                    kind=item.kind,
                    attempts=updated.attempts,
                    error=error,
                    smtp_code=code,
                )
            elif updated.status == "pending":
                log.warning(
                    "mail_failed",
                    key=item.key,
                    linkedid=item.request.linkedid,
                    kind=item.kind,
                    attempt=updated.attempts,
                    error=error,
                    smtp_code=code,
                    next_attempt_in=round(max(updated.next_attempt - when, 0.0), 3),
                )
            return False
        try:
            self.outbox.mark_sent(item, reply, self._clock())
        except Exception:
            # The server has it; the row will be sent again after the claim expires. The
            # Message-ID is the same, so the receiving side can drop the duplicate.
            log.exception("mail_sent_unrecorded", key=item.key, linkedid=item.request.linkedid,
                          kind=item.kind, smtp_reply=reply)
            raise
        log.info("mail_sent", key=item.key, linkedid=item.request.linkedid, kind=item.kind,
                 attempt=attempt, smtp_reply=reply)
        return True

    def _started(self) -> None:
        log.info("mail_worker_started", store=self.outbox.db.where, smtp=f"{self.cfg.host}:{self.cfg.port}")

    def _stopped(self) -> None:
        log.info("mail_worker_stopped")


# --- the CLI's view -------------------------------------------------------


def outbox_report(outbox: Outbox) -> str:
    """A table of pending and failed messages for `calmline outbox`."""
    now = time.time()
    items = [item for item in outbox.items() if item.status in ("pending", "failed")]
    sent = outbox.counts()["sent"]
    if not items:
        return "outbox is empty" + (f" ({sent} sent)" if sent else "")
    lines = text_table(("KEY", "KIND", "STATUS", "ATTEMPTS", "NEXT ATTEMPT", "LAST ERROR"), [
        (sanitize_line(item.key, 40), item.kind, item.status, str(item.attempts),
         when_text(item.next_attempt, now) if item.status == "pending" else "-",
         sanitize_line(item.last_error or "", 80) or "-")
        for item in items
    ])
    pending = sum(item.status == "pending" for item in items)
    return "\n".join([*lines, "", f"{pending} pending, {len(items) - pending} failed, {sent} sent"])


__all__ = [
    "CALLER_FIELDS",
    "MailError",
    "OutboxWorker",
    "TEAM_FIELDS",
    "build_caller_message",
    "build_message",
    "build_team_message",
    "check_templates",
    "message_id",
    "outbox_report",
    "sanitize_body",
    "sanitize_header",
    "sanitize_line",
    "send",
]
