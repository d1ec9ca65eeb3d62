"""warn: play the caller the warning of the next stage of the ladder.

The count lives on the caller's channel, so whichever service instance takes the next press
knows how many warnings this caller has had.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from calmline.actions.catalog import LADDER_EXHAUSTED, WARNING_PLAYED
from calmline.fastagi.contract import Action, ActionContext, parse_count
from calmline.config import WarnConfig

if TYPE_CHECKING:
    from calmline.actions.alert import Alerter
    from calmline.actions.cooldown import CooldownStarter


class Warn:
    """Escalating warnings: stage 1, stage 2 (final), then repeat the last, or run `end`
    (given when `after_last = "end"`)."""

    def __init__(self, config: WarnConfig, end: Action | None = None, *, alert: Alerter | None = None,
                 cooldown: CooldownStarter | None = None):
        self._config = config
        self._end = end
        self._alert = alert
        self._cooldown = cooldown

    async def run(self, context: ActionContext) -> str:
        counter = self._config.counter_variable
        raw = context.values.get(counter, "")
        count = parse_count(raw)
        given = count or 0
        if raw and count is None:
            context.audit.problem("warning_counter_invalid", variable=counter, value=raw[:40])
        stages = self._config.stages
        stage = given + 1
        if stage > len(stages) and self._end is not None:
            await context.audit.step(LADDER_EXHAUSTED, warnings=given)
            return await self._end.run(context)
        index = min(stage, len(stages)) - 1
        prompt = stages[index].prompt
        await context.channel.stream_file(prompt)
        # The counter moves only once the step is committed: a service killed in between
        # leaves neither, and the next press plays the same stage again.
        await context.audit.step(
            WARNING_PLAYED,
            warning=stage,
            final=index == len(stages) - 1,
            repeated=stage > len(stages),
            prompt=prompt,
        )
        await context.channel.set_variable(counter, str(stage))
        if stage == len(stages) and self._alert is not None:
            await self._alert.escalate(context, "final_warning", stage)
        if self._cooldown is not None and index == len(stages) - 1:
            await self._cooldown.begin(context, "final_warning")
        return "completed"
