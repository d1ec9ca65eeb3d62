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
