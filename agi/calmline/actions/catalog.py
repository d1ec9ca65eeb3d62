"""The one table of calmline's actions, and the names of the steps they record.

Each action is declared here once: its features.conf name, its request path, the config key
of its keypad code, whether the config enables it, the leg it runs on, the channel variables
it reads, whether it runs on a dead channel, its place in the report and how to build it.
Everything that lists actions derives from this table: the registry the service serves,
the rendered dialplan, the config's code-clash check, `calmline check` and the report.

The module imports neither the config nor the actions at import time (they are imported
where they are needed), so `calmline.config` can consult it while it validates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from calmline.actions.alert import Alerter
    from calmline.actions.cooldown import CooldownStore
    from calmline.actions.lookup import CallerLookups
    from calmline.callback.outbox import Outbox
    from calmline.config import Config
    from calmline.fastagi.contract import Action, RunsOn

# Steps, by name: the actions record them, the report reads them.
WARNING_PLAYED = "warning_played"
LADDER_EXHAUSTED = "ladder_exhausted"
TRANSFER_PROMPT_PLAYED = "transfer_prompt_played"
CALLER_TRANSFERRED = "caller_transferred"
EXTENSION_KEYED = "extension_keyed"
EXTENSION_REJECTED = "extension_rejected"
TRANSFER_RESULT = "transfer_result"
CALLBACK_QUEUED = "callback_queued"
CALLBACK_NOT_QUEUED = "callback_not_queued"
CALL_MARKED = "call_marked"
CLOSING_PROMPT_PLAYED = "closing_prompt_played"
CALLER_HUNG_UP_BY_AGENT = "caller_hung_up_by_agent"
LISTEN_REQUESTED = "listen_requested"
LISTEN_ANSWERED = "listen_answered"
LISTEN_ENDED = "listen_ended"
ALERT_QUEUED = "alert_queued"
ALERT_NOT_QUEUED = "alert_not_queued"
ALERT_USER_EVENT = "alert_user_event"

# What the hangup handler of a transferred caller reads (the rendered dialplan sets them).
TRANSFER_RESULT_READS = ("CALMLINE_XFER_STATUS", "DIALSTATUS", "CALMLINE_XFER_TARGET",
                         "CALMLINE_XFER_BY", "CALMLINE_XFER_FALLBACK")


@dataclass(frozen=True)
class Wiring:
    """What actions need beyond the config: the outbox End commits to, how to wake its worker,
    and the alerter that raises escalations (the webhooks' outbox and the AMI UserEvent)."""

    outbox: Outbox | None = None
    wake: Callable[[], None] = lambda: None
    alert: Alerter | None = None
    cooldowns: CooldownStore | None = None
    wake_cooldowns: Callable[[], None] = lambda: None
    lookups: CallerLookups | None = None


def _cooldown(c: Config, w: Wiring):
    """The cool-down starter the actions call, or None when cool-downs are off."""
    if not c.cooldown.enabled or w.cooldowns is None:
        return None
    from calmline.actions.cooldown import CooldownStarter

    return CooldownStarter(c.cooldown, w.cooldowns, w.wake_cooldowns)


def _cooldown_reads(c: Config, *triggers: str) -> tuple[str, ...]:
    """MEMBERINTERFACE, for an action after which a cool-down may start."""
    from calmline.actions.cooldown import INTERFACE_VARIABLE

    wanted = c.cooldown.enabled and any(t in c.cooldown.after for t in triggers)
    return (INTERFACE_VARIABLE,) if wanted else ()


@dataclass(frozen=True)
class Escalation:
    """How the report counts an action: its kind (a chart series), its legend label, and the
    word for one press in a call's ladder."""

    kind: str
    label: str
    ladder: str


@dataclass(frozen=True)
class ActionSpec:
    """One action. `code_key` is None for an action no keypad code fires (transfer/result)."""

    name: str
    path: str
    code_key: str | None
    runs_on: RunsOn
    enabled: Callable[[Config], bool]
    reads: Callable[[Config], tuple[str, ...]]
    build: Callable[[Config, Wiring], Action]
    dead_ok: bool = False
    escalation: Escalation | None = None

    @property
    def activate_on(self) -> Literal["peer", "self"]:
        """features.conf's word for the leg: the agent presses, `peer` runs on the caller."""
        return "peer" if self.runs_on == "caller" else "self"

    def code(self, config: Config) -> str:
        """The keypad code, read from the config at `code_key`."""
        return reduce(getattr, self.code_key.split("."), config)


@dataclass(frozen=True)
class Feature:
    """An enabled keypad code: what the dialplan renders and `calmline check` compares."""

    name: str
    code: str
    activate_on: Literal["peer", "self"]
    path: str
    key: str


# --- how each action is built ---------------------------------------------------------


def _end_reads(c: Config) -> tuple[str, ...]:
    return (c.warn.counter_variable, c.mail.caller_email_variable, *_cooldown_reads(c, "end"))


def _build_end(c: Config, w: Wiring) -> Action:
    from calmline.actions.end import End

    return End(c.end, counter_variable=c.warn.counter_variable,
               email_variable=c.mail.caller_email_variable, outbox=w.outbox, wake=w.wake,
               alert=w.alert, cooldown=_cooldown(c, w))


def _warn_delegates(c: Config) -> bool:
    return c.warn.after_last == "end"


def _build_warn(c: Config, w: Wiring) -> Action:
    from calmline.actions.warn import Warn

    return Warn(c.warn, _build_end(c, w) if _warn_delegates(c) else None, alert=w.alert,
                cooldown=_cooldown(c, w))


def _build_transfer(name: str) -> Callable[[Config, Wiring], Action]:
    def build(c: Config, w: Wiring) -> Action:
        from calmline.actions.transfer import Transfer

        t = c.transfer
        return Transfer(name, getattr(t, name), t.context, c.warn.counter_variable, alert=w.alert,
                        cooldown=_cooldown(c, w))

    return build


def _build_keyed(c: Config, w: Wiring) -> Action:
    from calmline.actions.transfer import KeyedColleagueTransfer

    t = c.transfer
    return KeyedColleagueTransfer(t.colleague_keyed, t.colleague, t.context, alert=w.alert,
                                  counter_variable=c.warn.counter_variable, cooldown=_cooldown(c, w))


def _build_transfer_result(c: Config, w: Wiring) -> Action:
    from calmline.actions.transfer import TransferResult

    return TransferResult()


WARN = ActionSpec(
    name="calmline_warn", path="warn", code_key="warn.code", runs_on="caller",
    enabled=lambda c: c.warn.enabled,
    # Past the last stage Warn may run End, so it reads what End reads.
    reads=lambda c: tuple(dict.fromkeys(
        (c.warn.counter_variable, *(_end_reads(c) if _warn_delegates(c) else ()),
         *_cooldown_reads(c, "final_warning")))),
    build=_build_warn,
    escalation=Escalation("warning", "warning", "warn"),
)
SUPERVISOR = ActionSpec(
    name="calmline_supervisor", path="transfer/supervisor", code_key="transfer.supervisor.code",
    runs_on="caller",
    enabled=lambda c: c.transfer.enabled,
    reads=lambda c: (c.warn.counter_variable, *_cooldown_reads(c, "transfer")),
    build=_build_transfer("supervisor"),
    escalation=Escalation("supervisor", "transfer to supervisor", "supervisor"),
)
COLLEAGUE = ActionSpec(
    name="calmline_colleague", path="transfer/colleague", code_key="transfer.colleague.code",
    runs_on="caller",
    enabled=lambda c: c.transfer.enabled,
    reads=lambda c: (c.warn.counter_variable, *_cooldown_reads(c, "transfer")),
    build=_build_transfer("colleague"),
    escalation=Escalation("colleague", "transfer to colleague", "colleague"),
)
COLLEAGUE_KEYED = ActionSpec(
    name="calmline_colleague_keyed", path="transfer/colleague-keyed",
    code_key="transfer.colleague_keyed.code", runs_on="agent",
    enabled=lambda c: c.transfer.enabled and c.transfer.colleague_keyed.enabled,
    reads=lambda c: _cooldown_reads(c, "transfer"),
    build=_build_keyed,
    escalation=Escalation("colleague", "transfer to colleague", "colleague"),
)
END = ActionSpec(
    name="calmline_end", path="end", code_key="end.code", runs_on="caller",
    enabled=lambda c: c.end.enabled,
    reads=_end_reads,
    build=_build_end,
    escalation=Escalation("end", "call ended", "end"),
)
# Not a keypad code: the rendered transfer context runs it when a transferred call ends.
TRANSFER_RESULT_ACTION = ActionSpec(
    name="calmline_transfer_result", path="transfer/result", code_key=None, runs_on="caller",
    enabled=lambda c: c.transfer.enabled,
    reads=lambda c: TRANSFER_RESULT_READS,
    build=_build_transfer_result,
    dead_ok=True,
)



def _build_listen(c: Config, w: Wiring) -> Action:
    from calmline.actions.listen import Listen

    return Listen(c.listen)


def _build_listen_result(c: Config, w: Wiring) -> Action:
    from calmline.actions.listen import ListenResult

    return ListenResult()


def _listen_result_reads(c: Config) -> tuple[str, ...]:
    from calmline.actions.listen import LISTEN_RESULT_READS

    return LISTEN_RESULT_READS


LISTEN = ActionSpec(
    name="calmline_listen", path="listen", code_key="listen.code", runs_on="agent",
    enabled=lambda c: c.listen.enabled,
    reads=lambda c: (),
    build=_build_listen,
)
# Not a keypad code: the rendered listen context runs it on answer and when the listen-in ends.
LISTEN_RESULT_ACTION = ActionSpec(
    name="calmline_listen_result", path="listen/result", code_key=None, runs_on="agent",
    enabled=lambda c: c.listen.enabled,
    reads=_listen_result_reads,
    build=_build_listen_result,
    dead_ok=True,
)

def _build_lookup(c: Config, w: Wiring) -> Action:
    from calmline.actions.lookup import Lookup

    return Lookup(c.lookup, w.lookups)


# Not a keypad code: the inbound route runs it before queueing (the rendered example shows how).
LOOKUP = ActionSpec(
    name="calmline_lookup", path="lookup", code_key=None, runs_on="caller",
    enabled=lambda c: c.lookup.enabled,
    reads=lambda c: (),
    build=_build_lookup,
)

ACTIONS: tuple[ActionSpec, ...] = (WARN, SUPERVISOR, COLLEAGUE, COLLEAGUE_KEYED, END, TRANSFER_RESULT_ACTION,
                                   LISTEN, LISTEN_RESULT_ACTION, LOOKUP)


def enabled(config: Config) -> list[ActionSpec]:
    return [spec for spec in ACTIONS if spec.enabled(config)]


def features(config: Config) -> list[Feature]:
    """The keypad codes of the enabled actions, in the order the dialplan lists them."""
    return [
        Feature(spec.name, spec.code(config), spec.activate_on, spec.path, spec.code_key)
        for spec in enabled(config) if spec.code_key is not None
    ]

