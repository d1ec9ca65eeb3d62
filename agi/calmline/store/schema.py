"""The store's schema as numbered migrations, written once per dialect.

A store records the highest version applied in `schema_version`; `Database.migrate()`
applies the rest in order, each in its own transaction, and refuses a store whose version
is newer than the code (an older calmline must not write into a layout it does not know).
"""

from __future__ import annotations

# The columns of `events` that are copied out of the event so reads can select and index
# them; `data` keeps the whole event as its JSON line.
EVENT_COLUMNS = ("event_id", "ts", "event", "level", "session", "action", "step", "outcome",
                 "linkedid", "uniqueid", "agent", "caller_number", "caller_name", "data")

_EVENTS = """
CREATE TABLE events (
    id {serial},
    event_id TEXT NOT NULL UNIQUE,
    ts TEXT NOT NULL,
    event TEXT NOT NULL,
    level TEXT,
    session TEXT,
    action TEXT,
    step TEXT,
    outcome TEXT,
    linkedid TEXT,
    uniqueid TEXT,
    agent TEXT,
    caller_number TEXT,
    caller_name TEXT,
    data TEXT NOT NULL
)"""

_OUTBOX = """
CREATE TABLE outbox (
    id {serial},
    key TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('team', 'caller')),
    recipient TEXT,
    linkedid TEXT,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt {real} NOT NULL DEFAULT 0,
    last_error TEXT,
    smtp_reply TEXT,
    queued_at {real} NOT NULL,
    sent_at {real},
    request TEXT NOT NULL,
    UNIQUE (key, kind)
)"""

_INDEXES = [
    "CREATE INDEX events_ts ON events (ts)",
    "CREATE INDEX events_linkedid ON events (linkedid)",
    "CREATE INDEX events_caller ON events (caller_number, ts)",
    "CREATE INDEX events_agent ON events (agent, ts)",
    "CREATE INDEX outbox_due ON outbox (status, next_attempt)",
    "CREATE INDEX outbox_linkedid ON outbox (linkedid)",
]


# The console: supervisors' accounts, the failed logins that slow and lock an account, and
# the indexes its pages read through (escalations by kind and time, a session's steps).
_CONSOLE_USERS = """
CREATE TABLE console_users (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at TEXT NOT NULL
)"""

_CONSOLE_FAILURES = """
CREATE TABLE console_failures (
    name TEXT PRIMARY KEY,
    failures INTEGER NOT NULL,
    last_at {real} NOT NULL,
    locked_until {real} NOT NULL DEFAULT 0
)"""

_CONSOLE_INDEXES = [
    "CREATE INDEX events_event_ts ON events (event, ts)",
    "CREATE INDEX events_session ON events (session, event)",
]

# The report: the sessions begun in a period and each session's steps and end, read from the
# indexes alone (covering), so a 90-day report does not fetch a million table rows.
_REPORT_INDEXES = [
    "CREATE INDEX events_report_start ON events (event, ts, action, session, linkedid, uniqueid, agent)",
    "CREATE INDEX events_report_steps ON events (session, event, step, outcome)",
    # A warning step's `"final": true` as the audit encoder writes it (see audit/report.py).
    "CREATE INDEX events_final_warning ON events (session) "
    "WHERE step = 'warning_played' AND data LIKE '%\"final\": true%'",
]
_WEBHOOKS = """
CREATE TABLE webhooks (
    id {serial},
    key TEXT NOT NULL,
    url TEXT NOT NULL,
    linkedid TEXT,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt {real} NOT NULL DEFAULT 0,
    last_error TEXT,
    http_status INTEGER,
    queued_at {real} NOT NULL,
    sent_at {real},
    body TEXT NOT NULL,
    UNIQUE (key, url)
)"""


# The cool-downs: each one pauses an agent's queue interface now and unpauses it at due_at.
# Any instance may take a due row (claimed with a lease in next_attempt), so a restart or a
# second instance still unpauses on time, and only one of them acts.
_COOLDOWNS = """
CREATE TABLE cooldowns (
    id {serial},
    key TEXT NOT NULL UNIQUE,
    interface TEXT NOT NULL,
    linkedid TEXT,
    trigger TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pausing', 'paused', 'done')),
    queues TEXT,
    created_at {real} NOT NULL,
    due_at {real} NOT NULL,
    next_attempt {real} NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    outcome TEXT,
    last_error TEXT
)"""

_COOLDOWN_INDEXES = [
    "CREATE INDEX cooldowns_due ON cooldowns (state, next_attempt)",
    "CREATE INDEX cooldowns_interface ON cooldowns (interface, state)",
    # The lookup's (and the console's) count of a caller's escalated calls: a session_start
    # per escalation, covered, so a caller's count never reads the table.
    "CREATE INDEX events_caller_starts ON events (caller_number, ts, action, linkedid, session) "
    "WHERE event = 'session_start'",
]


def _both(*statements: str) -> dict[str, list[str]]:
    return {
        "sqlite": [s.format(serial="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL") for s in statements],
        "postgresql": [s.format(serial="BIGSERIAL PRIMARY KEY", real="DOUBLE PRECISION") for s in statements],
    }


MIGRATIONS: list[tuple[int, str, dict[str, list[str]]]] = [
    (1, "events and the callback outbox", _both(_EVENTS, _OUTBOX, *_INDEXES)),
    (2, "console accounts and the console's indexes",
     _both(_CONSOLE_USERS, _CONSOLE_FAILURES, *_CONSOLE_INDEXES)),
    (3, "the report's covering indexes", _both(*_REPORT_INDEXES)),
    (4, "the webhook outbox of live alerts", _both(
        _WEBHOOKS, "CREATE INDEX webhooks_due ON webhooks (status, next_attempt)")),
    (5, "the cool-downs' pending pauses and unpauses, the caller lookup's index",
     _both(_COOLDOWNS, *_COOLDOWN_INDEXES)),
]

VERSION = MIGRATIONS[-1][0]


# --- 6: escalations, one row per escalation, kept by the database itself -----------------------
# The console's lists, counts and filters read this narrow table instead of grouping the
# events: triggers fill it in the same statement that inserts (or prunes) the events, so it
# can never disagree with them; the migration fills it from the events already stored.

_PATHS = "('warn', 'transfer/supervisor', 'transfer/colleague', 'transfer/colleague-keyed', 'end')"
_FINAL = """'%"final": true%'"""


def endpoint(channel: str | None) -> str:
    """The agent's endpoint from its channel: `PJSIP/alice-0000002a` -> `PJSIP/alice`,
    `Local/x@agents-00000001;1` -> `Local/x@agents`. `endpoint_sql` is the same in SQL."""
    channel = channel or ""
    if len(channel) >= 11 and channel[-11] == "-" and channel[-2] == ";":
        return channel[:-11]
    if len(channel) >= 9 and channel[-9] == "-":
        return channel[:-9]
    return channel


def endpoint_sql(column: str) -> str:
    """`endpoint()` as SQL both engines run: what the escalations table stores, and what the
    report reads from events."""
    return (f"CASE WHEN {column} LIKE '%-________;_' THEN substr({column}, 1, length({column}) - 11) "
            f"WHEN {column} LIKE '%-________' THEN substr({column}, 1, length({column}) - 9) "
            f"ELSE COALESCE({column}, '') END")


def _start_kind(action: str) -> str:
    return (f"CASE {action} WHEN 'warn' THEN 'warning' WHEN 'end' THEN 'end' "
            f"WHEN 'transfer/supervisor' THEN 'supervisor' ELSE 'colleague' END")


_ESCALATIONS = """
CREATE TABLE escalations (
    id {serial},
    session TEXT,
    linkedid TEXT,
    ts TEXT NOT NULL,
    action TEXT NOT NULL,
    kind TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    agent TEXT,
    caller_number TEXT,
    caller_name TEXT,
    outcome TEXT
)"""

_ESCALATION_INDEXES = [
    # Covering the columns each page groups by, so a 90-day page never reads the table rows.
    "CREATE INDEX escalations_ts ON escalations (ts, linkedid)",
    "CREATE INDEX escalations_linkedid ON escalations (linkedid, ts, caller_number)",
    "CREATE INDEX escalations_session ON escalations (session)",
    "CREATE INDEX escalations_endpoint ON escalations (endpoint, ts, kind, linkedid)",
    "CREATE INDEX escalations_caller ON escalations (caller_number, ts, linkedid)",
    "CREATE INDEX escalations_kind ON escalations (kind, ts)",
]

_BACKFILL = f"""
INSERT INTO escalations (session, linkedid, ts, action, kind, endpoint, agent, caller_number, caller_name, outcome)
SELECT e.session, e.linkedid, e.ts, e.action,
    CASE WHEN e.action = 'warn' AND EXISTS (SELECT 1 FROM events x WHERE x.session = e.session
             AND x.event = 'step' AND x.step = 'ladder_exhausted') THEN 'end'
         WHEN e.action = 'warn' AND EXISTS (SELECT 1 FROM events x WHERE x.session = e.session
             AND x.event = 'step' AND x.step = 'warning_played' AND x.data LIKE {_FINAL}) THEN 'final_warning'
         ELSE {_start_kind('e.action')} END,
    {endpoint_sql('e.agent')}, e.agent, e.caller_number, e.caller_name,
    (SELECT x.outcome FROM events x WHERE x.session = e.session AND x.event = 'session_end' ORDER BY x.id LIMIT 1)
FROM events e WHERE e.event = 'session_start' AND e.action IN {_PATHS} ORDER BY e.id"""

_INSERT_NEW = (f"INSERT INTO escalations (session, linkedid, ts, action, kind, endpoint, agent, caller_number, "
               f"caller_name) VALUES (NEW.session, NEW.linkedid, NEW.ts, NEW.action, {_start_kind('NEW.action')}, "
               f"{endpoint_sql('NEW.agent')}, NEW.agent, NEW.caller_number, NEW.caller_name)")
_STEP_KIND = (f"UPDATE escalations SET kind = CASE WHEN NEW.step = 'ladder_exhausted' THEN 'end' "
              f"WHEN kind = 'warning' AND NEW.data LIKE {_FINAL} THEN 'final_warning' ELSE kind END "
              f"WHERE session = NEW.session AND action = 'warn'")
_END_OUTCOME = "UPDATE escalations SET outcome = NEW.outcome WHERE session = NEW.session AND outcome IS NULL"
_FORGET = "DELETE FROM escalations WHERE session = OLD.session AND ts = OLD.ts"

_SQLITE_TRIGGERS = [
    f"CREATE TRIGGER escalation_started AFTER INSERT ON events "
    f"WHEN NEW.event = 'session_start' AND NEW.action IN {_PATHS} BEGIN {_INSERT_NEW}; END",
    f"CREATE TRIGGER escalation_step AFTER INSERT ON events "
    f"WHEN NEW.event = 'step' AND NEW.step IN ('warning_played', 'ladder_exhausted') BEGIN {_STEP_KIND}; END",
    f"CREATE TRIGGER escalation_ended AFTER INSERT ON events "
    f"WHEN NEW.event = 'session_end' AND NEW.action IN {_PATHS} BEGIN {_END_OUTCOME}; END",
    f"CREATE TRIGGER escalation_pruned AFTER DELETE ON events "
    f"WHEN OLD.event = 'session_start' AND OLD.action IN {_PATHS} BEGIN {_FORGET}; END",
]

_PG_TRIGGERS = [
    f"""CREATE FUNCTION calmline_escalations() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF OLD.event = 'session_start' AND OLD.action IN {_PATHS} THEN {_FORGET}; END IF;
        RETURN NULL;
    END IF;
    IF NEW.event = 'session_start' AND NEW.action IN {_PATHS} THEN {_INSERT_NEW};
    ELSIF NEW.event = 'step' AND NEW.step IN ('warning_played', 'ladder_exhausted') THEN {_STEP_KIND};
    ELSIF NEW.event = 'session_end' AND NEW.action IN {_PATHS} THEN {_END_OUTCOME};
    END IF;
    RETURN NULL;
END
$fn$""",
    "CREATE TRIGGER escalations_sync AFTER INSERT OR DELETE ON events FOR EACH ROW "
    "EXECUTE FUNCTION calmline_escalations()",
]


def _escalations() -> dict[str, list[str]]:
    both = _both(_ESCALATIONS, *_ESCALATION_INDEXES, _BACKFILL)
    both["sqlite"] += _SQLITE_TRIGGERS
    both["postgresql"] += _PG_TRIGGERS
    return both


MIGRATIONS.append((6, "escalations, kept by triggers on events", _escalations()))
VERSION = MIGRATIONS[-1][0]


# --- 7: fewer indexes on events -------------------------------------------------------------
# Every index on `events` is written by every audit commit. Since migration 6 nothing reads
# these four: events by caller or agent are read from `escalations` (or the lookup's partial
# index), and the wider events_report_start (event, ts, …) and events_report_steps
# (session, event, …) serve the reads by event and time and by session.
_UNUSED = ("events_caller", "events_agent", "events_event_ts", "events_session")
MIGRATIONS.append((7, "drop the events indexes nothing reads since migration 6",
                   _both(*(f"DROP INDEX IF EXISTS {name}" for name in _UNUSED))))
VERSION = MIGRATIONS[-1][0]


# --- 8: the report's transfer results through their own index -------------------------------
# A partial index holds only the transfer results' starts (a few in a hundred sessions), so
# the report reads a period's results without walking every session start in it, and the
# audit writer touches it only for those rows. Its leading event and action are constant, but
# without them SQLite's planner (no statistics) prefers events_report_start (event=?, ts>?).
MIGRATIONS.append((8, "the transfer results' starts, indexed apart", _both(
    "CREATE INDEX IF NOT EXISTS events_transfer_results ON events (event, action, ts, session, linkedid, uniqueid, agent) "
    "WHERE event = 'session_start' AND action = 'transfer/result'")))
VERSION = MIGRATIONS[-1][0]
