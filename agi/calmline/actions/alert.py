"""Live alert: tell the team, while the call is still on, that it escalated.

At the final warning, a transfer and an end the action calls `Alerter.escalate`, which first
commits one webhook per `[alert] urls` entry to the store (the worker POSTs them later, so the
call never waits for a receiver), then raises the AMI event `CalmlineEscalation` with the
dialplan application `UserEvent` on the channel (no AMI login needed). Caller-supplied values
are reduced to characters that cannot split UserEvent's arguments or add a header.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable
from datetime import datetime, timezone

from calmline.actions.catalog import ALERT_NOT_QUEUED, ALERT_QUEUED, ALERT_USER_EVENT
from calmline.callback.webhooks import WebhookOutbox
from calmline.config import AlertConfig
from calmline.errors import ApplicationMissing
from calmline.fastagi.contract import ActionContext

USER_EVENT = "CalmlineEscalation"
KINDS = ("final_warning", "transfer", "end")
# Commas split UserEvent's arguments, `|` was its old separator, quotes, backslashes and
# parentheses change how Asterisk splits them, `$`/`{` would be expanded by AGIEXECFULL.
_UNSAFE = re.compile(r"[^A-Za-z0-9 .+@/_:;#*=-]")


def event_value(value: object, limit: int = 80) -> str:
    """A value safe inside a UserEvent header: one line, no argument or header separators."""
    return _UNSAFE.sub("_", str(value))[:limit].strip() or "-"


class Alerter:
    """Raises an escalation: the webhooks' outbox rows, then the UserEvent on the channel."""

    def __init__(self, get_config: Callable[[], AlertConfig], outbox: WebhookOutbox | None,
                 wake: Callable[[], None] = lambda: None):
        self._config = get_config
        self._outbox = outbox
        self._wake = wake

    async def escalate(self, context: ActionContext, kind: str, warnings: int, target: str = "") -> None:
        cfg = self._config()
        if not cfg.enabled:
            return
        call = context.call
        linkedid = call.linkedid or call.uniqueid
        key = hashlib.sha256(f"{linkedid}|{kind}|{target}|{warnings}".encode()).hexdigest()[:32]
        if cfg.urls and self._outbox is not None:
            payload = {
                "event": USER_EVENT, "id": key, "kind": kind, "target": target or None,
                "warnings": warnings, "linkedid": call.linkedid, "uniqueid": call.uniqueid,
                "agent": call.agent_channel, "caller_number": call.caller_number,
                "caller_name": call.caller_name, "channel": call.channel,
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            try:
                added = await asyncio.to_thread(self._outbox.add, key, list(cfg.urls), payload,
                                                linkedid=call.linkedid)
            except Exception as exc:  # the call goes on; the trail keeps the alert
                await context.audit.step(ALERT_NOT_QUEUED, kind=kind, key=key,
                                         error=f"{type(exc).__name__}: {exc}", payload=payload)
            else:
                await context.audit.step(ALERT_QUEUED, kind=kind, key=key, webhooks=added,
                                         duplicate=added == 0)
                self._wake()
        if cfg.user_event and context.channel.alive:
            headers = {
                "Kind": kind, "Target": target or "-", "Warnings": warnings,
                "CallLinkedid": call.linkedid, "CallUniqueid": call.uniqueid,
                "Agent": call.agent_channel, "CallerNumber": call.caller_number, "AlertId": key,
            }
            body = ",".join(f"{name}: {event_value(value)}" for name, value in headers.items())
            try:
                await context.channel.exec("UserEvent", f"{USER_EVENT},{body}")
            except ApplicationMissing as exc:
                context.audit.problem("alert_user_event_failed", kind=kind, error=str(exc))
            else:
                await context.audit.step(ALERT_USER_EVENT, kind=kind, key=key, user_event=USER_EVENT)
