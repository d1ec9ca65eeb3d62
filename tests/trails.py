"""Audit trails written the way calmline's sessions and actions write them, at chosen times,
through the store's real write path (`AuditStore`)."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta

from calmline.audit.store import AuditStore
from calmline.store import Database

_ids = itertools.count(1)


def warned(n: int, final: bool = False):
    return ("warning_played", {"warning": n, "final": final, "repeated": False, "prompt": f"calmline/warn-{n}"})


END_STEPS = [("callback_queued", {"key": "k", "duplicate": False, "caller_email": False, "warnings": 2}),
             ("call_marked", {"cdr_userfield": "calmline:ended", "cel_event": "CALMLINE_ENDED"}),
             ("closing_prompt_played", {"prompt": "calmline/end"}),
             ("caller_hung_up_by_agent", {"warnings": 2})]


def transferred(target: str, **extra):
    return [("transfer_prompt_played", {"target": target, "prompt": f"calmline/transfer-{target}"}),
            ("caller_transferred",
             {"target": target, "dial": "PJSIP/sup", "reason": "abusive", "warnings": 1, **extra})]


def result(target: str, status: str, fallback: str | None, by: str):
    return [("transfer_result", {"target": target, "dial_status": status, "answered": status == "ANSWER",
                                 "fallback": fallback, "transferred_by": by})]


class Trail:
    """Sessions (start, steps, end) submitted to a real AuditStore."""

    def __init__(self, db: Database):
        self.store = AuditStore(db)
        self.store.open()

    def session(self, at: datetime, action: str, *, linkedid: str, agent: str = "",
                number: str | None = "+4930111", name: str = "", steps=(), outcome="completed",
                error=None, started: bool = True, sid: str | None = None) -> None:
        sid = sid or f"t{next(_ids)}"
        common = {"session": sid, "peer": "127.0.0.1:40000", "action": action, "uniqueid": linkedid,
                  "channel": "PJSIP/caller-00000001", "caller_number": number, "caller_name": name}
        if started:
            common |= {"linkedid": linkedid, "agent": agent, "caller_channel": "PJSIP/caller-00000001"}
        clock = itertools.count()

        def emit(event: str, level="info", **fields):
            ts = (at + timedelta(milliseconds=100 * next(clock))).isoformat(timespec="microseconds")
            self.store.submit({**common, "event": event, "level": level, "ts": ts, **fields})

        if started:
            emit("session_start", params=None)
        for step, fields in steps:
            emit("step", step=step, **fields)
        end = {"outcome": outcome, "status": "ok" if outcome == "completed" else "failed", "duration_ms": 12.5}
        if error:
            emit("session_end", level="warning", error=error, **end)
        else:
            emit("session_end", **end)

    def event(self, at: datetime, event: str, **fields) -> None:
        self.store.submit({"event": event, "level": "info", "ts": at.isoformat(timespec="microseconds"),
                           **fields})

    def close(self):
        assert self.store.flush()
        self.store.close()
