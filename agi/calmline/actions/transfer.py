"""transfer: hand the caller to a supervisor or a colleague, out of the agent's bridge.

The caller is moved with ChannelRedirect into the rendered transfer context, which rings the
target from config and falls back when nobody answers; the agent's leg is freed at once.
What the receiver should know travels as variables on the caller's channel.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from calmline.actions.catalog import (
    CALLER_TRANSFERRED,
    EXTENSION_KEYED,
    EXTENSION_REJECTED,
    TRANSFER_PROMPT_PLAYED,
    TRANSFER_RESULT,
)
from calmline.fastagi.contract import ActionContext, parse_count
from calmline.fastagi.channel import channel_argument
from calmline.config import ColleagueKeyedConfig, TransferTarget
from calmline.errors import CalmlineError

if TYPE_CHECKING:
    from calmline.actions.alert import Alerter
    from calmline.actions.cooldown import CooldownStarter

_DIGITS = re.compile(r"^[0-9]{1,20}$")


class InvalidExtension(CalmlineError):
    """The agent keyed nothing, or digits the configured pattern does not accept."""

    outcome = "invalid_extension"


class Transfer:
    """Run on the caller's channel (feature `peer`): prompt, label, redirect."""

    def __init__(self, name: str, target: TransferTarget, context: str, counter_variable: str,
                 *, alert: Alerter | None = None,
                 cooldown: CooldownStarter | None = None):
        self._cooldown = cooldown
        self._name = name
        self._target = target
        self._context = context
        self._counter = counter_variable
        self._alert = alert

    async def run(self, context: ActionContext) -> str:
        channel, target = context.channel, self._target
        warnings = context.values.get(self._counter, "") or "0"
        await channel.stream_file(target.prompt)
        await context.audit.step(TRANSFER_PROMPT_PLAYED, target=self._name, prompt=target.prompt)
        labels = {
            "CALMLINE_XFER_TARGET": self._name,
            "CALMLINE_XFER_REASON": target.reason,
            "CALMLINE_XFER_BY": context.call.agent_channel,
            "CALMLINE_XFER_AT": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "CALMLINE_XFER_WARNINGS": str(parse_count(warnings) or 0),
        }
        for name, value in labels.items():
            # `__` makes them inherited by the target's channel too (screen pops, whisper).
            await channel.set_variable("__" + name, value)
        if self._alert is not None:  # before the redirect takes the channel from this session
            await self._alert.escalate(context, "transfer", int(labels["CALMLINE_XFER_WARNINGS"]), self._name)
        await channel.redirect(self._context, self._name)
        await context.audit.step(
            CALLER_TRANSFERRED, target=self._name, dial=target.dial, reason=target.reason,
            warnings=int(labels["CALMLINE_XFER_WARNINGS"]),
        )
        if self._cooldown is not None:
            await self._cooldown.begin(context, "transfer")
        return "completed"


class KeyedColleagueTransfer:
    """Run on the agent's own channel (feature `self`): the agent keys the colleague's
    extension; only a valid entry moves the caller, anything else leaves the call as it was."""

    def __init__(self, config: ColleagueKeyedConfig, target: TransferTarget, context: str,
                 *, alert: Alerter | None = None, counter_variable: str = "CALMLINE_WARNINGS",
                 cooldown: CooldownStarter | None = None):
        self._cooldown = cooldown
        self._counter = counter_variable
        self._config = config
        self._target = target
        self._context = context
        self._alert = alert
        self._pattern = re.compile(config.pattern)

    async def run(self, context: ActionContext) -> str:
        cfg, channel = self._config, context.channel
        keyed = await channel.get_data(cfg.prompt, cfg.timeout_seconds * 1000, cfg.max_digits)
        if not keyed or not _DIGITS.match(keyed) or not self._pattern.fullmatch(keyed):
            await channel.stream_file(cfg.invalid_prompt)
            reason = "nothing keyed" if not keyed else f"{keyed[:20]!r} does not match transfer.colleague_keyed.pattern"
            await context.audit.step(EXTENSION_REJECTED, keyed=(keyed or "")[:20], reason=reason)
            raise InvalidExtension(reason)
        await context.audit.step(EXTENSION_KEYED, extension=keyed)
        caller = channel_argument(context.call.caller_channel)
        agent = channel_argument(context.call.agent_channel)
        for name, value in (
            ("CALMLINE_XFER_TARGET", f"colleague {keyed}"),
            ("CALMLINE_XFER_REASON", self._target.reason),
            ("CALMLINE_XFER_BY", agent),
            ("CALMLINE_XFER_AT", datetime.now(timezone.utc).isoformat(timespec="seconds")),
        ):
            await channel.set_variable_on(caller, "__" + name, value)
        if self._alert is not None:
            # The warnings count lives on the caller's channel (IMPORT is in func_logic).
            warnings = parse_count(await channel.evaluate(f"${{IMPORT({caller},{self._counter})}}")) or 0
            await self._alert.escalate(context, "transfer", warnings, f"colleague {keyed}")
        await channel.redirect(self._context, f"k{keyed}", other=caller)
        await context.audit.step(CALLER_TRANSFERRED, target="colleague_keyed", extension=keyed,
                                 caller_channel=context.call.caller_channel)
        if self._cooldown is not None:
            await self._cooldown.begin(context, "transfer")
        return "completed"


class TransferResult:
    """Run from the transferred caller's hangup handler (on a dead channel): records how the
    transfer ended, from the variables the rendered dialplan left."""

    async def run(self, context: ActionContext) -> str:
        values = context.values
        status = values.get("CALMLINE_XFER_STATUS") or values.get("DIALSTATUS") or "UNKNOWN"
        await context.audit.step(
            TRANSFER_RESULT,
            target=values.get("CALMLINE_XFER_TARGET", ""),
            dial_status=status,
            answered=status == "ANSWER",
            fallback=values.get("CALMLINE_XFER_FALLBACK") or None,
            transferred_by=values.get("CALMLINE_XFER_BY", ""),
        )
        return "completed"
