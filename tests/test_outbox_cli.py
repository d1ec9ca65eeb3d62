"""`calmline outbox` as an admin runs it: what is pending, and sending it now."""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import datetime, timezone

from aiosmtpd.controller import Controller

from calmline.callback.outbox import CallbackRequest
from stores import outbox_at  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def calmline(config, *args):
    return subprocess.run([sys.executable, "-m", "calmline", "-c", str(config), *args],
                          capture_output=True, text=True, timeout=60)


def test_outbox_lists_pending_mail_then_retry_now_sends_it(tmp_path):
    port = free_port()
    box_path = tmp_path / "outbox.sqlite3"
    config = tmp_path / "calmline.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{box_path}"\n[mail]\nport = {port}\nteam_address = "team@example.com"\n')
    with outbox_at(box_path) as box:
        box.add(CallbackRequest(
            key="1795350788.44", created_at=datetime.now(timezone.utc), caller_number="+15551234567",
            caller_name="Bob", agent="PJSIP/alice-00000001", warnings=2, reason="abusive caller",
            uniqueid="1795350788.44", linkedid="1795350788.44", channel="PJSIP/trunk-00000002",
        ))

    listed = calmline(config, "outbox")
    assert listed.returncode == 0
    assert "1795350788.44" in listed.stdout and "pending" in listed.stdout

    down = calmline(config, "outbox", "--retry-now")  # nothing listens yet: still pending, exit 1
    assert down.returncode == 1
    assert "0 sent, 1 still failing" in down.stdout

    received = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
            received.append(envelope.rcpt_tos)
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        sent = calmline(config, "outbox", "--retry-now")
    finally:
        controller.stop()
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "1 sent" in sent.stdout
    assert received == [["team@example.com"]]
    assert "outbox is empty" in calmline(config, "outbox").stdout


def test_outbox_lists_undelivered_webhooks_and_retry_now_posts_them(tmp_path):
    """A live alert the receiver refused shows under `webhooks:`; once the receiver is back,
    `--retry-now` delivers it, signed, and the listing says so."""
    import hashlib
    import hmac
    import os
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from calmline.callback.webhooks import WebhookOutbox
    from stores import sqlite_db

    answers, received = [503], []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.headers["X-Calmline-Signature"], body))
            self.send_response(answers.pop(0) if answers else 204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/hook"
    box_path = tmp_path / "store.sqlite3"
    config = tmp_path / "calmline.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{box_path}"\n[mail]\nport = {free_port()}\n'
                      f'[alert]\nurls = ["{url}"]\nretry_initial_seconds = 3600.0\n')
    db = sqlite_db(box_path)
    db.open_checked()
    with WebhookOutbox(db) as hooks:
        assert hooks.add("1795350788.44-final_warning", [url], {"event": "final_warning"}, linkedid="1795350788.44")
    env = {**os.environ, "CALMLINE_ALERT_SECRET": "s3cret"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "calmline", "-c", str(config), "outbox", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=60, env=env)
    try:
        listed = run()
        assert listed.returncode == 0, listed.stderr
        assert "webhooks:" in listed.stdout and url in listed.stdout and "1 pending, 0 failed, 0 sent" in listed.stdout

        refused = run("--retry-now")  # the receiver answers 503: still pending, exit 1
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "retried 1 webhook(s): 0 delivered, 1 still failing" in refused.stdout
        assert "HTTP 503" in refused.stdout

        posted = run("--retry-now")
        assert posted.returncode == 0, posted.stdout + posted.stderr
        assert "1 delivered, 0 still failing" in posted.stdout
        assert "webhooks: none waiting (1 sent)" in posted.stdout
    finally:
        server.shutdown()
    assert len(received) == 2
    signature, body = received[-1]
    assert signature == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert "webhooks" not in run_without_alerts(tmp_path).stdout


def run_without_alerts(tmp_path):
    """A site that never queued a webhook sees only its mail."""
    config = tmp_path / "plain.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path / "plain.sqlite3"}"\n')
    with outbox_at(tmp_path / "plain.sqlite3"):
        pass
    return calmline(config, "outbox")
