"""end: close the call with a way back, and never lose the callback request.

The request is committed to the outbox before the caller hears anything, so a hangup at any
later step still leaves it; mail goes out from the outbox worker after the hangup, never
inside the caller's session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from calmline.actions.catalog import (
    CALL_MARKED,
    CALLBACK_NOT_QUEUED,
    CALLBACK_QUEUED,
    CALLER_HUNG_UP_BY_AGENT,
    CLOSING_PROMPT_PLAYED,
)
from calmline.fastagi.contract import ActionContext, parse_count
from calmline.config import EndConfig
from calmline.errors import ApplicationMissing, PromptMissing
from calmline.callback.outbox import CallbackRequest, Outbox

if TYPE_CHECKING:
    from calmline.actions.alert import Alerter
    from calmline.actions.cooldown import CooldownStarter

CEL_EVENT = "CALMLINE_ENDED"


class End:
    """Mark the call in CDR/CEL, queue the callback request, play the closing prompt, hang up."""

    def __init__(
        self,
        config: EndConfig,
        *,
        counter_variable: str,
        email_variable: str,
        outbox: Outbox | None,
        wake: Callable[[], None] = lambda: None,
        alert: Alerter | None = None,
        cooldown: CooldownStarter | None = None,
    ):
        self._config = config
        self._counter = counter_variable
        self._email = email_variable
        self._outbox = outbox
        self._wake = wake
        self._alert = alert
        self._cooldown = cooldown

    async def run(self, context: ActionContext) -> str:
        cfg, channel = self._config, context.channel
        raw = context.values.get(self._counter, "")
        warnings = parse_count(raw) or 0
        missing_prompt: PromptMissing | None = None
        try:
            await self._queue_callback(context, warnings)
            await channel.set_variable("CDR(userfield)", cfg.cdr_userfield)
            try:
                await channel.exec("CELGenUserEvent", f"{CEL_EVENT},{cfg.cdr_userfield}")
            except ApplicationMissing as exc:
                context.audit.problem("cel_mark_failed", error=str(exc))
            await context.audit.step(CALL_MARKED, cdr_userfield=cfg.cdr_userfield, cel_event=CEL_EVENT)
            if self._alert is not None:
                await self._alert.escalate(context, "end", warnings)
            try:
                await channel.stream_file(cfg.prompt)
                await context.audit.step(CLOSING_PROMPT_PLAYED, prompt=cfg.prompt)
            except PromptMissing as exc:
                missing_prompt = exc  # the agent asked for the call to end: end it anyway
            await channel.hangup()
            await context.audit.step(CALLER_HUNG_UP_BY_AGENT, warnings=warnings)
        finally:
            self._wake()
            # The agent ended the call, even if the caller hung up first: the agent rests.
            if self._cooldown is not None:
                await self._cooldown.begin(context, "end")
        if missing_prompt is not None:
            raise missing_prompt
        return "completed"

    async def _queue_callback(self, context: ActionContext, warnings: int) -> None:
        """Commit the callback request before the caller hears anything."""
        if self._outbox is None:
            return
        call = context.call
        fields = {
            "key": call.linkedid or call.uniqueid,
            "created_at": datetime.now(timezone.utc),
            "caller_number": call.caller_number,
            "caller_name": call.caller_name,
            "caller_email": context.values.get(self._email) or None,
            "agent": call.agent_channel,
            "warnings": warnings,
            "reason": self._config.reason,
            "uniqueid": call.uniqueid,
            "linkedid": call.linkedid,
            "channel": call.channel,
        }
        try:
            request = CallbackRequest(**fields)
            added = await asyncio.to_thread(self._outbox.add, request)
        except Exception as exc:  # the call still ends; the request survives in the audit trail
            await context.audit.step(
                CALLBACK_NOT_QUEUED, error=f"{type(exc).__name__}: {exc}", request=fields,
            )
            return
        await context.audit.step(
            CALLBACK_QUEUED, key=request.key, duplicate=not added,
            caller_email=bool(request.caller_email), warnings=warnings,
        )
