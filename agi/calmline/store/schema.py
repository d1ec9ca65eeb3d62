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
