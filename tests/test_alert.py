"""Live alert on the fake Asterisk and a real HTTP receiver: the UserEvent's arguments, the
webhooks' signature, and exactly one delivery per escalation per URL through an outage."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import run
from fake_asterisk import bridged_caller, environment, run_session
from stores import sqlite_db

from calmline.actions.alert import event_value
from calmline.callback.webhooks import WebhookOutbox, WebhookWorker, verify
from calmline.config import AlertConfig, parse
from calmline.errors import ConfigError

SECRET = "s3cret-for-tests"


class Receiver:
    """A real HTTP server on loopback that checks each POST's signature and keeps it.

    `fail_first` answers 503 to the first request on each of those paths *after* keeping it,
    as a receiver whose answer is lost would: the sender must retry with the same key.
    """

    def __init__(self, port: int = 0, fail_first: tuple[str, ...] = ()):
        self.received: list[dict] = []
        self.bad_signatures = 0
        self._failed: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's hook name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if not verify(SECRET, body, self.headers.get("X-Calmline-Signature", "")):
                    outer.bad_signatures += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                outer.received.append({"path": self.path, "key": self.headers["Idempotency-Key"],
                                       "body": json.loads(body)})
                if self.path in fail_first and self.path not in outer._failed:
                    outer._failed.add(self.path)
                    self.send_response(503)
                else:
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alert_section(port: int, **more) -> dict:
    return {"urls": [f"http://127.0.0.1:{port}/a", f"http://127.0.0.1:{port}/b"],
            "retry_initial_seconds": 0.2, "retry_max_seconds": 0.4, "timeout": 2.0, **more}


def test_escalations_reach_each_url_once_through_an_outage_of_the_receiver(serving, monkeypatch):
    monkeypatch.setenv("CALMLINE_ALERT_SECRET", SECRET)
    port = free_port()  # nothing listens there yet: the receiver is down

    async def main():
        async with serving(alert=alert_section(port)) as svc:
            caller = bridged_caller()
            for _ in range(2):  # warning 1, then the final warning: one escalation
                await run_session(svc.port, caller, environment("warn"))
            await run_session(svc.port, caller, environment("end"))  # the second
            # the calls went on and ended while the receiver was down
            ends = [e["outcome"] for e in svc.events(event="session_end")]
            assert ends == ["completed"] * 3
            outbox = svc.svc.webhooks.outbox
            await _until(lambda: sum(1 for w in outbox.items() if w.attempts >= 2) == 4)
            assert outbox.counts()["pending"] == 4
            receiver = Receiver(port, fail_first=("/b",))
            try:
                await _until(lambda: outbox.counts()["sent"] == 4, timeout=20)
                await asyncio.sleep(1.0)  # long enough for any stray retry to show
            finally:
                receiver.stop()
            return svc, caller, receiver, outbox.items()

    svc, caller, receiver, rows = run(main())
    assert receiver.bad_signatures == 0
    by_path = {}
    for got in receiver.received:
        by_path.setdefault(got["path"], []).append(got)
    # /a: one delivery per escalation; /b: its first one again, after the lost answer
    assert sorted(g["body"]["kind"] for g in by_path["/a"]) == ["end", "final_warning"]
    keys_b = [g["key"] for g in by_path["/b"]]
    assert len(keys_b) == 3 and len(set(keys_b)) == 2
    duplicated = [g for g in by_path["/b"] if keys_b.count(g["key"]) == 2]
    assert duplicated[0]["body"] == duplicated[1]["body"]
    assert {g["key"] for g in by_path["/a"]} == set(keys_b)
    final = next(g["body"] for g in by_path["/a"] if g["body"]["kind"] == "final_warning")
    assert final["warnings"] == 2 and final["linkedid"] == "1795350788.44"
    assert final["caller_number"] == "+15551234567" and final["caller_name"] == 'Angry "Bob" Smith'
    assert final["agent"] == "Local/warnscn@sim-agent-00000017;1" and final["event"] == "CalmlineEscalation"
    assert all(r.status == "sent" and r.http_status == 204 for r in rows)
    failures = svc.events(event="webhook_failed")
    assert failures and all("cannot POST" in f["error"] or "HTTP 503" in f["error"] for f in failures)
    steps = [e["step"] for e in svc.events(event="step")]
    assert steps.count("alert_queued") == 2 and steps.count("alert_user_event") == 2
    user_events = [d for a, d in caller.apps_run if a == "UserEvent"]
    assert [d.split(",")[1] for d in user_events] == ["Kind: final_warning", "Kind: end"]


async def _until(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def test_a_replayed_escalation_is_not_queued_twice(tmp_path):
    box = WebhookOutbox(sqlite_db(tmp_path / "s.sqlite3"))
    urls = ["http://127.0.0.1:1/a"]
    assert box.add("k1", urls, {"kind": "end"}) == 1
    assert box.add("k1", urls, {"kind": "end"}) == 0
    assert box.add("k1", urls + ["http://127.0.0.1:1/b"], {"kind": "end"}) == 1


def test_two_workers_never_take_the_same_row(tmp_path):
    path = tmp_path / "s.sqlite3"
    first, second = WebhookOutbox(sqlite_db(path)), WebhookOutbox(sqlite_db(path))
    first.add("k1", ["http://127.0.0.1:1/a", "http://127.0.0.1:1/b"], {"kind": "end"}, now=0)
    taken = first.due(10.0, limit=1, claim_for=60)
    other = second.due(10.0, limit=5, claim_for=60)
    assert len(taken) == 1 and len(other) == 1 and taken[0].id != other[0].id
    assert second.due(10.0, limit=5, claim_for=60) == []


def test_a_missing_secret_keeps_the_webhook_pending_and_says_which_key(tmp_path, monkeypatch):
    monkeypatch.delenv("CALMLINE_TEST_NO_SECRET", raising=False)
    receiver = Receiver()
    try:
        box = WebhookOutbox(sqlite_db(tmp_path / "s.sqlite3"))
        cfg = AlertConfig(urls=[f"http://127.0.0.1:{receiver.port}/a"], secret_env="CALMLINE_TEST_NO_SECRET")
        box.add("k1", cfg.urls, {"kind": "end"})
        worker = WebhookWorker(box, cfg)
        assert worker.deliver_due_now() == (0, 1)
        [row] = box.items()
        assert row.status == "pending" and row.last_error.startswith("alert.secret_env: CALMLINE_TEST_NO_SECRET is not set")
        assert receiver.received == []
        monkeypatch.setenv("CALMLINE_TEST_NO_SECRET", SECRET)
        box.due(time.time() + 3600)  # (a read: nothing claimed)
        worker._clock = lambda: time.time() + 3600
        assert worker.deliver_due_now() == (1, 0)
        assert [r["key"] for r in receiver.received] == ["k1"]
    finally:
        receiver.stop()


def test_hostile_caller_id_cannot_add_userevent_headers(serving):
    async def main():
        async with serving(warn={"stages": [{"prompt": "calmline/warn-final"}]}) as svc:
            caller = bridged_caller()
            env = environment("warn", callerid="+1,Kind: end|x(y", calleridname="a\\\"b")
            await run_session(svc.port, caller, env)
            return caller

    caller = run(main())
    [data] = [d for a, d in caller.apps_run if a == "UserEvent"]
    parts = data.split(",")
    assert parts[0] == "CalmlineEscalation"
    assert [p.split(":", 1)[0] for p in parts[1:]] == [
        "Kind", "Target", "Warnings", "CallLinkedid", "CallUniqueid", "Agent", "CallerNumber", "AlertId"]
    assert "CallerNumber: +1_Kind: end_x_y" in parts
    assert event_value("a\nb\"c$d{e}") == "a_b_c_d_e_"


@pytest.mark.parametrize("url", ["ftp://x/y", "http://user:pw@host/x", "http://host/a b", "http://"])
def test_a_bad_webhook_url_is_refused(url):
    with pytest.raises(ConfigError) as info:
        parse(f'[alert]\nurls = ["{url}"]\n')
    assert info.value.problems[0].startswith("<config>: alert.urls[0]: a webhook URL is http:// or https://")


def test_a_reload_applies_new_alert_urls_and_retry_policy_to_the_next_escalation(serving, tmp_path):
    from conftest import make_config

    async def main():
        async with serving() as svc:
            await run_session(svc.port, bridged_caller(), environment("end"))  # no urls yet
            new = make_config(tmp_path, alert={"urls": ["http://127.0.0.1:1/new"], "max_attempts": 3})
            assert svc.svc.reload(lambda: (new, "reloaded.toml"))
            assert svc.svc.webhooks.cfg.max_attempts == 3
            caller = bridged_caller()
            caller.functions["CHANNEL(linkedid)"] = "1795350799.99"
            await run_session(svc.port, caller, environment("end"))
            return svc, [w.url for w in svc.svc.webhooks.outbox.items()]

    svc, urls = run(main())
    assert urls == ["http://127.0.0.1:1/new"]
    reloaded = svc.events(event="config_reloaded")[0]
    assert "alert.urls" in reloaded["changed"] and "alert.max_attempts" in reloaded["changed"]


def test_check_says_when_the_webhook_secret_is_not_set(monkeypatch):
    from calmline.admin import check
    from calmline.config import Config

    monkeypatch.delenv("CALMLINE_TEST_HOOK_SECRET", raising=False)
    cfg = Config.model_validate({"alert": {"urls": ["https://hooks.example.com/x"],
                                           "secret_env": "CALMLINE_TEST_HOOK_SECRET"}})
    problems, _ = check._check_alert(cfg)
    assert problems and problems[0].startswith("alert.secret_env: CALMLINE_TEST_HOOK_SECRET is not set")
    monkeypatch.setenv("CALMLINE_TEST_HOOK_SECRET", "x")
    assert check._check_alert(cfg) == ([], ["alert webhooks to 1 URL(s) can be signed"])
    assert check._check_alert(Config()) == ([], [])


def test_the_webhook_backlog_and_its_oldest_age_are_metrics(tmp_path):
    from calmline.metrics import OutboxCollector

    db = sqlite_db(tmp_path / "s.sqlite3")
    box = WebhookOutbox(db)
    box.add("k1", ["http://127.0.0.1:1/a", "http://127.0.0.1:1/b"], {"kind": "end"}, now=1000.0)
    box.add("k2", ["http://127.0.0.1:1/a"], {"kind": "end"}, now=1100.0)
    [first, *_] = box.due(2000.0, limit=1)
    box.mark_sent(first, 204, 1200.0)
    collector = OutboxCollector(db, clock=lambda: 1500.0, mail=False)
    samples = {(m.name, s.labels["channel"]): s.value for m in collector.collect() for s in m.samples}
    collector.close()
    assert samples[("calmline_outbox_pending", "webhook")] == 2
    assert samples[("calmline_outbox_oldest_pending_age_seconds", "webhook")] == 500.0
    assert samples[("calmline_outbox_failed", "webhook")] == 0
    assert ("calmline_outbox_pending", "mail") not in samples
