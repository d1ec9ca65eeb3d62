"""Build a large audit store the way the service writes one, for benchmarks of what reads it.

The trail goes through the store's own write path: every event is a dict shaped like the ones
the session and the actions emit (captured from the real service under the fake Asterisk:
`session_start`, the action's `step`s, `session_end`, the outbox's `callback_queued` and
`caller_mail_skipped`, the mail worker's `mail_sent`/`mail_failed`/`mail_gave_up`), submitted
to `AuditStore` (group commit, unique event ids). The End action's callback requests go
through `Outbox.add`, and their delivery through `mark_sent`/`mark_retry`, so the outbox
rows are what the worker leaves. Only the clock is simulated: events carry the times of a
90-day history instead of now.

    python3 bench/big_store.py --url sqlite:////tmp/big.sqlite3 --events 1000000

`build(url, events)` is the same from Python; it returns a `Built` with what was written and
an independent tally (`Truth`) of what a report over the whole period must count.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agi"))

import structlog  # noqa: E402

from calmline.audit.store import AuditStore, new_event_id  # noqa: E402
from calmline.callback.outbox import CallbackRequest, Outbox  # noqa: E402
from calmline.config import MailConfig  # noqa: E402
from calmline.store import Connection, Database  # noqa: E402

AGENTS = 200
DAYS = 90
FIRST_NAMES = ["Jordan", "Sam", "Priya", "Lee", "María", "Ahmed", "Olga", "Chen", "Fatou", "Jonas",
               "Aino", "Tomás", "Yuki", "Grace", "Omar", "Ingrid", "Kwame", "Lucía", "Noah", "Zoë"]
LAST_NAMES = ["Miller", "Novak", "Raman", "Okafor", "García", "Schmidt", "Ivanova", "Chen", "Diallo",
              "Berg", "Virtanen", "Silva", "Tanaka", "Hughes", "Haddad", "Larsen", "Mensah"]
# Caller names a hostile network could send: markup, quotes, bidi overrides, controls.
HOSTILE_NAMES = ['<script>alert(1)</script>', 'Angry "Bob" O\'Neil & co', "Mallory \u202egnp.exe",
                 "Eve\x1b[31m red", "<img src=x onerror=alert(2)>"]
MAIL_REPLY = "250 2.0.0 Ok: queued as {}"


@dataclass
class Truth:
    """What a report over the whole history must count, tallied as the trail is generated."""

    per_day: Counter = field(default_factory=Counter)  # (date, kind) -> escalations
    per_agent: Counter = field(default_factory=Counter)  # (endpoint, kind) -> escalations
    agent_calls: dict[str, set] = field(default_factory=dict)  # endpoint -> linkedids
    outcomes: Counter = field(default_factory=Counter)  # outcome -> escalations
    transfer_results: Counter = field(default_factory=Counter)  # answered/fallback/no_result/not_transferred
    answered_per_day: Counter = field(default_factory=Counter)  # (date, "answered"/"fallback") by transfer day
    calls: int = 0
    callers: Counter = field(default_factory=Counter)  # caller number -> escalated calls

    def as_json(self) -> dict:
        """The tally with string keys: `day kind`, `agent kind`, agent -> calls."""
        return {
            "per_day": {f"{day.isoformat()} {kind}": n for (day, kind), n in self.per_day.items()},
            "per_agent": {f"{agent} {kind}": n for (agent, kind), n in self.per_agent.items()},
            "agent_calls": {agent: len(calls) for agent, calls in self.agent_calls.items()},
            "outcomes": dict(self.outcomes),
            "transfer_results": dict(self.transfer_results),
            "answered_per_day": {f"{day.isoformat()} {r}": n for (day, r), n in self.answered_per_day.items()},
            "calls": self.calls,
            "callers": dict(self.callers),
        }

    def escalation(self, at: datetime, kind: str, endpoint: str, linkedid: str, outcome: str) -> None:
        self.per_day[(at.date(), kind)] += 1
        self.per_agent[(endpoint, kind)] += 1
        self.agent_calls.setdefault(endpoint, set()).add(linkedid)
        self.outcomes[outcome] += 1


@dataclass
class Built:
    url: str
    events: int = 0
    sessions: int = 0
    calls: int = 0
    outbox_rows: int = 0
    first: datetime | None = None
    last: datetime | None = None
    seconds: float = 0.0
    truth: Truth = field(default_factory=Truth)


class _Capture:
    """structlog, pointed at a list: the outbox's own events, stamped later with the sim clock."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, logger, name, event):
        event["level"] = "warning" if name == "warn" else name
        self.events.append(event)
        raise structlog.DropEvent


class BuildDatabase(Database):
    """The store as the service opens it, except that commits do not wait for the disk: a
    store half built when the machine crashes is thrown away anyway, and the rows are the same."""

    def connect(self) -> Connection:
        conn = super().connect()
        if self.kind == "sqlite":
            conn.execute("PRAGMA synchronous = OFF")
        else:
            conn.execute("SET synchronous_commit = off")
        return conn


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="microseconds")


class _Generator:
    def __init__(self, db: Database, target: int, *, days: int, agents: int, end: datetime, seed: int,
                 progress: Callable[[int, int], None] | None):
        self.rng = random.Random(seed)
        self.db = db
        self.target = target
        self.days = days
        self.until = end
        self.progress = progress
        self.agents = [f"PJSIP/agent{i:03d}" for i in range(agents)]
        self.built = Built(db.url)
        self.pending: list[tuple[str, int, dict]] = []  # a heap of (ts, order, event) not yet submitted
        self.order = 0
        self.call_no = 0
        self.session_no = 0
        self.instance = os.urandom(3).hex()
        self.outbox = Outbox(db)
        self.mail = MailConfig(max_attempts=5)
        self.capture = _Capture()
        structlog.configure(processors=[self.capture], logger_factory=structlog.ReturnLoggerFactory(),
                            cache_logger_on_first_use=False)
        # Callers: most call once or twice, some come back often, one very often.
        self.regulars = [self._number() for _ in range(400)]
        self.heavy = self._number()

    # --- who -----------------------------------------------------------------------------

    def _number(self) -> str:
        return f"+4930{self.rng.randrange(10**7):07d}"

    def _caller(self) -> tuple[str, str]:
        r = self.rng.random()
        if r < 0.03:
            return "anonymous", ""  # withheld: Asterisk's word for it
        if r < 0.04:
            return "", ""  # no number at all
        if r < 0.05:
            number = self.heavy
        elif r < 0.20:
            number = self.rng.choice(self.regulars)
        else:
            number = self._number()
        if self.rng.random() < 0.002:
            return number, self.rng.choice(HOSTILE_NAMES)
        if self.rng.random() < 0.3:
            return number, ""
        return number, f"{self.rng.choice(FIRST_NAMES)} {self.rng.choice(LAST_NAMES)}"

    # --- emitting --------------------------------------------------------------------------

    def _emit(self, at: datetime, event: dict) -> None:
        event["ts"] = _iso(at)
        event.setdefault("level", "info")
        event["event_id"] = new_event_id()
        self.order += 1
        heapq.heappush(self.pending, (event["ts"], self.order, event))

    def _session(self, at: datetime, action: str, call: dict, *, agent_leg: bool = False,
                 dead: bool = False) -> tuple[dict, Callable]:
        """The identity the session binds, and an `emit(event, **fields)` that advances its clock."""
        self.session_no += 1
        self.built.sessions += 1
        sid = f"{call['instance']}-{self.session_no}"
        channel = call["agent_channel"] if agent_leg else call["caller_channel"]
        bound = {"session": sid, "peer": f"10.0.0.{1 + self.session_no % 4}:{30000 + self.session_no % 30000}",
                 "action": action, "uniqueid": call["agent_uniqueid"] if agent_leg else call["linkedid"],
                 "channel": channel, "caller_number": call["number"], "caller_name": call["name"]}
        started = {**bound, "linkedid": call["linkedid"], "agent": "" if dead else call["agent_channel"],
                   "caller_channel": call["caller_channel"]}
        clock = [at]

        def emit(event: str, *, level: str = "info", pause: float = 0.002, identity: dict | None = None,
                 **fields) -> datetime:
            clock[0] += timedelta(seconds=pause)
            self._emit(clock[0], {**(identity or started), **fields, "event": event, "level": level})
            return clock[0]

        emit("session_start", params=None, pause=0.0)
        return bound, emit

    def _end_session(self, emit, outcome: str = "completed", error: str | None = None, duration: float = 0.01) -> datetime:
        fields = {"outcome": outcome, "status": "ok" if outcome == "completed" else "failed",
                  "duration_ms": round(duration * 1000, 3)}
        if error:
            return emit("session_end", level="warning", error=error, pause=0.001, **fields)
        return emit("session_end", pause=0.001, **fields)

    # --- the actions ----------------------------------------------------------------------

    def warn(self, at: datetime, call: dict) -> datetime:
        _, emit = self._session(at, "warn", call)
        stage = call["warnings"] + 1
        r = self.rng.random()
        truth = self.built.truth
        endpoint = call["agent"]
        if r < 0.03:  # the caller hung up during the prompt
            truth.escalation(at, "warning", endpoint, call["linkedid"], "caller_hung_up")
            return self._end_session(emit, "caller_hung_up", "the caller hung up (HANGUP)", 4.2)
        if r < 0.035:
            truth.escalation(at, "warning", endpoint, call["linkedid"], "prompt_missing")
            prompt = "calmline/warn-1" if stage == 1 else "calmline/warn-final"
            return self._end_session(emit, "prompt_missing", f"prompt {prompt} is missing", 0.02)
        final = stage >= 2
        emit("step", step="warning_played", warning=stage, final=final, repeated=stage > 2,
             prompt="calmline/warn-final" if final else "calmline/warn-1", pause=9.0 + self.rng.random())
        call["warnings"] = stage
        truth.escalation(at, "final_warning" if final else "warning", endpoint, call["linkedid"], "completed")
        return self._end_session(emit, duration=9.5)

    def transfer(self, at: datetime, call: dict, target: str) -> datetime:
        _, emit = self._session(at, f"transfer/{target}", call)
        truth, endpoint = self.built.truth, call["agent"]
        if self.rng.random() < 0.02:
            truth.escalation(at, target, endpoint, call["linkedid"], "caller_hung_up")
            truth.transfer_results["not_transferred"] += 1
            return self._end_session(emit, "caller_hung_up", "the caller hung up (HANGUP)", 2.0)
        emit("step", step="transfer_prompt_played", target=target, prompt=f"calmline/transfer-{target}", pause=4.0)
        emit("step", step="caller_transferred", target=target, dial=f"PJSIP/{target}-desk",
             reason="abusive caller", warnings=call["warnings"], pause=0.01)
        done = self._end_session(emit, duration=4.1)
        truth.escalation(at, target, endpoint, call["linkedid"], "completed")
        self._result(done, call, target, at)
        call["over"] = True
        return done

    def keyed(self, at: datetime, call: dict) -> datetime:
        _, emit = self._session(at, "transfer/colleague-keyed", call, agent_leg=True)
        truth, endpoint = self.built.truth, call["agent"]
        if self.rng.random() < 0.15:
            keyed = str(self.rng.randrange(10, 100))
            reason = f"{keyed!r} does not match transfer.colleague_keyed.pattern"
            emit("step", step="extension_rejected", keyed=keyed, reason=reason, pause=6.0)
            truth.escalation(at, "colleague", endpoint, call["linkedid"], "invalid_extension")
            truth.transfer_results["not_transferred"] += 1
            return self._end_session(emit, "invalid_extension", reason, 6.5)
        extension = str(self.rng.randrange(2000, 2100))
        emit("step", step="extension_keyed", extension=extension, pause=5.0)
        emit("step", step="caller_transferred", target="colleague_keyed", extension=extension,
             caller_channel=call["caller_channel"], pause=0.01)
        done = self._end_session(emit, duration=5.1)
        truth.escalation(at, "colleague", endpoint, call["linkedid"], "completed")
        self._result(done, call, f"colleague {extension}", at)
        call["over"] = True
        return done

    def _result(self, at: datetime, call: dict, target: str, transferred_at: datetime) -> None:
        """The transferred caller's hangup handler, later: how the transfer ended (or never, 4%)."""
        truth = self.built.truth
        if self.rng.random() < 0.04:
            truth.transfer_results["no_result"] += 1
            return
        answered = self.rng.random() < 0.7
        status = "ANSWER" if answered else self.rng.choice(["NOANSWER", "BUSY", "CHANUNAVAIL"])
        later = at + timedelta(seconds=self.rng.uniform(20, 600) if answered else 30)
        _, emit = self._session(later, "transfer/result", call, dead=True)
        emit("step", step="transfer_result", target=target, dial_status=status, answered=answered,
             fallback=None if answered else "queue support", transferred_by=call["agent_channel"])
        self._end_session(emit, duration=0.004)
        result = "answered" if answered else "fallback"
        truth.transfer_results[result] += 1
        truth.answered_per_day[(transferred_at.date(), result)] += 1

    def end(self, at: datetime, call: dict) -> datetime:
        bound, emit = self._session(at, "end", call)
        truth, endpoint = self.built.truth, call["agent"]
        email = (f"{call['name'].split()[0].lower()}.{self.call_no}@example.com"
                 if call["name"] and call["name"][0].isalpha() and self.rng.random() < 0.3 else None)
        request = CallbackRequest(
            key=call["linkedid"], created_at=at, caller_number=call["number"], caller_name=call["name"],
            caller_email=email, agent=call["agent_channel"], warnings=call["warnings"], reason="abusive caller",
            uniqueid=call["linkedid"], linkedid=call["linkedid"], channel=call["caller_channel"])
        queued_at = at + timedelta(milliseconds=3)
        self.capture.events.clear()
        added = self.outbox.add(request, now=queued_at.timestamp())
        identity = {**bound, "linkedid": call["linkedid"], "agent": call["agent_channel"],
                    "caller_channel": call["caller_channel"]}
        for logged in self.capture.events:  # the outbox's events, in the session's context
            emit(logged.pop("event"), identity={**identity, **logged}, pause=0.0001)
        emit("step", step="callback_queued", key=request.key, duplicate=not added,
             caller_email=bool(request.caller_email), warnings=call["warnings"])
        emit("step", step="call_marked", cdr_userfield="calmline:ended", cel_event="CALMLINE_ENDED")
        emit("step", step="closing_prompt_played", prompt="calmline/end", pause=3.0)
        emit("step", step="caller_hung_up_by_agent", warnings=call["warnings"])
        done = self._end_session(emit, duration=3.1)
        truth.escalation(at, "end", endpoint, call["linkedid"], "completed")
        if added:
            self._deliver(queued_at, request)
        call["over"] = True
        return done

    def _deliver(self, queued_at: datetime, request: CallbackRequest) -> None:
        """What the mail worker does with the request's rows: mostly sent, a few retried or given up."""
        items = [i for i in self.outbox.due(queued_at.timestamp() + 1, limit=10) if i.key == request.key]
        for item in items:
            self.built.outbox_rows += 1
            when = queued_at + timedelta(seconds=self.rng.uniform(0.2, 3))
            fate = self.rng.random()
            fails = 0 if fate < 0.95 else (self.mail.max_attempts if fate > 0.995 else 1)
            for attempt in range(1, fails + 1):
                error = "cannot connect to mail.example.com:25: [Errno 111] Connection refused"
                item = self.outbox.mark_retry(item, error, when.timestamp(), self.mail)
                fields = {"key": item.key, "linkedid": request.linkedid, "kind": item.kind, "error": error,
                          "smtp_code": None}
                if item.status == "failed":
                    self._emit(when, {**fields, "event": "mail_gave_up", "level": "error", "attempts": attempt})
                    break
                self._emit(when, {**fields, "event": "mail_failed", "level": "warning", "attempt": attempt,
                                  "next_attempt_in": round(item.next_attempt - when.timestamp(), 3)})
                when = datetime.fromtimestamp(item.next_attempt, timezone.utc)
            else:
                reply = MAIL_REPLY.format(f"{self.rng.randrange(16**10):010X}")
                self.outbox.mark_sent(item, reply, when.timestamp())
                self._emit(when, {"key": item.key, "linkedid": request.linkedid, "kind": item.kind,
                                  "attempt": fails + 1, "smtp_reply": reply, "event": "mail_sent", "level": "info"})

    # --- a call, a day, the whole history ---------------------------------------------------

    def call(self, at: datetime, instance: str) -> None:
        self.call_no += 1
        self.built.calls += 1
        number, name = self._caller()
        agent = self.rng.choice(self.agents)
        linkedid = f"{int(at.timestamp())}.{self.call_no}"
        call = {"linkedid": linkedid, "number": number, "name": name, "agent": agent, "instance": instance,
                "agent_channel": f"{agent}-{self.rng.randrange(16**8):08x}",
                "caller_channel": f"PJSIP/trunk-{self.rng.randrange(16**8):08x}",
                "agent_uniqueid": f"{int(at.timestamp())}.{self.call_no}1", "warnings": 0, "over": False}
        self.built.truth.calls += 1
        self.built.truth.callers[number] += 1
        r = self.rng.random()
        if r < 0.78:
            t = self.warn(at, call)
            while not call["over"] and call["warnings"] and self.rng.random() < (0.25 if call["warnings"] == 1 else 0.55):
                t += timedelta(seconds=self.rng.uniform(20, 240))
                if call["warnings"] >= 2:
                    follow = self.rng.random()
                    if follow < 0.64:
                        self.end(t, call)
                    elif follow < 0.91:
                        self.transfer(t, call, self.rng.choice(["supervisor", "colleague"]))
                    else:
                        self.warn(t, call)
                else:
                    self.warn(t, call)
        elif r < 0.85:
            self.transfer(at, call, "supervisor")
        elif r < 0.90:
            self.transfer(at, call, "colleague")
        elif r < 0.92:
            self.keyed(at, call)
        else:
            self.end(at, call)

    def _flush(self, store: AuditStore, before: str | None) -> None:
        while self.pending and (before is None or self.pending[0][0] < before):
            store.submit(heapq.heappop(self.pending)[2])
            self.built.events += 1

    def run(self, store: AuditStore) -> Built:
        started = time.perf_counter()
        first_day = (self.until - timedelta(days=self.days)).date()
        reported = 0
        for day in range(self.days):
            today = first_day + timedelta(days=day)
            instance = self.instance + f"{day:03x}"  # the service restarts every night
            # Calls today so that the history ends near the target, at the events per call so far.
            weights = [self._weight(first_day + timedelta(days=d)) for d in range(day, self.days)]
            per_call = (self.built.events + len(self.pending)) / self.built.calls if self.built.calls else 5.7
            left = self.target - self.built.events - len(self.pending)
            calls = round(left / per_call * weights[0] / sum(weights) * self.rng.uniform(0.9, 1.1))
            for start in sorted(self._business_second(today) for _ in range(max(calls, 1))):
                if self.built.events + len(self.pending) >= self.target:
                    break
                self.call(start, instance)
                self._flush(store, _iso(start - timedelta(hours=1)))
                if self.progress is not None and self.built.events - reported >= 50_000:
                    reported = self.built.events
                    self.progress(self.built.events, self.target)
        self._flush(store, None)
        if not store.flush(timeout=600):
            raise RuntimeError(f"the audit store did not commit everything to {self.db.where}")
        self.outbox.close()
        self.built.seconds = time.perf_counter() - started
        return self.built

    @staticmethod
    def _weight(day: date) -> float:
        return 0.4 if day.weekday() >= 5 else 1.0

    def _business_second(self, day: date) -> datetime:
        hour = min(23, max(0, int(self.rng.gauss(13, 3.2))))
        second = hour * 3600 + self.rng.randrange(3600)
        moment = datetime.combine(day, datetime.min.time(), timezone.utc) + timedelta(seconds=second)
        return min(moment, self.until - timedelta(minutes=30))


def build(url: str, events: int, *, days: int = DAYS, agents: int = AGENTS, end: datetime | None = None,
          seed: int = 1, progress: Callable[[int, int], None] | None = None) -> Built:
    """Write about `events` audit events (and their outbox rows) over the `days` before `end`
    into the store at `url` (created and migrated if new). The store should be empty."""
    end = (end or datetime.now(timezone.utc)).astimezone(timezone.utc)
    db = BuildDatabase(url)
    store = AuditStore(db, max_pending=10**9)
    store.open()
    try:
        generator = _Generator(db, events, days=days, agents=agents, end=end, seed=seed, progress=progress)
        built = generator.run(store)
    finally:
        store.close(timeout=600)
        structlog.reset_defaults()
    conn = db.connect()
    try:
        first, last = conn.execute("SELECT min(ts), max(ts) FROM events").fetchone()
    finally:
        conn.close()
    built.first = datetime.fromisoformat(first) if first else None
    built.last = datetime.fromisoformat(last) if last else None
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the store: sqlite:////abs/path.sqlite3 or postgresql://...")
    parser.add_argument("--events", type=int, default=1_000_000, help="about how many events (default 1000000)")
    parser.add_argument("--days", type=int, default=DAYS, help=f"history length in days (default {DAYS})")
    parser.add_argument("--agents", type=int, default=AGENTS, help=f"agents (default {AGENTS})")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--end", type=datetime.fromisoformat, help="when the history ends (default now, UTC)")
    parser.add_argument("--truth", type=Path, help="also write the tally of what a report must count, as JSON")
    args = parser.parse_args(argv)

    def progress(done: int, target: int) -> None:
        print(f"  {done:>9,} / {target:,} events", file=sys.stderr, flush=True)

    built = build(args.url, args.events, days=args.days, agents=args.agents, seed=args.seed, progress=progress,
                  end=args.end)
    if args.truth is not None:
        args.truth.write_text(json.dumps(built.truth.as_json()), encoding="utf-8")
    print(f"{built.events:,} events, {built.sessions:,} sessions, {built.calls:,} calls, "
          f"{built.outbox_rows:,} outbox rows, {built.first:%Y-%m-%d} .. {built.last:%Y-%m-%d}, "
          f"in {built.seconds:.1f}s ({built.events / max(built.seconds, 1e-9):,.0f} events/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
