"""A fake Asterisk manager interface on a real TCP socket, answering as app_queue in 22.10.1.

It knows the actions the cool-down sends (Login, Events, QueueStatus, QueuePause, Logoff)
and answers them in the wire format of apps/app_queue.c and main/manager.c: QueueStatus
is "Queue status will follow", then QueueParams/QueueMember events (the member's interface
under `Location:`), then QueueStatusComplete. The lab tests check the same flows on the
real Asterisk; this one lets the logic be tested in milliseconds and taken down at will.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from dataclasses import dataclass, field


@dataclass
class Member:
    paused: bool = False
    reason: str = ""


@dataclass
class FakeAMI:
    """`queues[queue][interface]` is a Member; `actions` records every action received."""

    username: str = "calmline"
    secret: str = "s3cret"
    queues: dict[str, dict[str, Member]] = field(default_factory=dict)
    actions: list[dict[str, str]] = field(default_factory=list)
    # queues.conf as GetConfig returns it: category -> its `name=value` lines
    queues_conf: dict[str, list[str]] = field(default_factory=dict)
    port: int = 0
    _server: socketserver.ThreadingTCPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> int:
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                fake._serve(self.rfile, self.wfile)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.port

    def stop(self) -> None:
        """AMI goes away: the port refuses connections until `start()` again."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def pauses(self) -> list[tuple[str, str, str, str]]:
        """(interface, queue, paused, reason) of each QueuePause received, in order."""
        return [(a.get("Interface", ""), a.get("Queue", ""), a.get("Paused", ""), a.get("Reason", ""))
                for a in self.actions if a.get("Action") == "QueuePause"]

    def _serve(self, rfile, wfile) -> None:
        wfile.write(b"Asterisk Call Manager/9.0.0\r\n")
        logged_in = False
        while True:
            message: dict[str, str] = {}
            while True:
                line = rfile.readline()
                if not line:
                    return
                text = line.decode().rstrip("\r\n")
                if not text:
                    break
                key, _, value = text.partition(":")
                message[key.strip()] = value.strip()
            if not message:
                continue
            with self._lock:
                self.actions.append(message)
                reply = self._answer(message, logged_in)
            if message.get("Action") == "Login" and reply.startswith("Response: Success"):
                logged_in = True
            wfile.write(reply.encode())
            wfile.flush()
            if message.get("Action") == "Logoff":
                return

    def _answer(self, m: dict[str, str], logged_in: bool) -> str:
        action = m.get("Action", "")
        aid = f"ActionID: {m['ActionID']}\r\n" if "ActionID" in m else ""
        if action == "Login":
            if m.get("Username") == self.username and m.get("Secret") == self.secret:
                return f"Response: Success\r\n{aid}Message: Authentication accepted\r\n\r\n"
            return f"Response: Error\r\n{aid}Message: Authentication failed\r\n\r\n"
        if not logged_in:
            return f"Response: Error\r\n{aid}Message: Permission denied\r\n\r\n"
        if action == "Logoff":
            return f"Response: Goodbye\r\n{aid}Message: Thanks for all the fish.\r\n\r\n"
        if action == "Events":
            return f"Response: Success\r\n{aid}Events: Off\r\n\r\n"
        if action == "QueuePause":
            return self._pause(m, aid)
        if action == "QueueStatus":
            return self._status(m, aid)
        if action == "GetConfig" and m.get("Filename") == "queues.conf":
            out = f"Response: Success\r\n{aid}"
            for i, (name, lines) in enumerate(self.queues_conf.items()):
                out += f"Category-{i:06d}: {name}\r\n"
                out += "".join(f"Line-{i:06d}-{j:06d}: {line}\r\n" for j, line in enumerate(lines))
            return out + "\r\n"
        return f"Response: Error\r\n{aid}Message: Invalid/unknown command: {action}.\r\n\r\n"

    def _pause(self, m: dict[str, str], aid: str) -> str:
        interface, queue = m.get("Interface", ""), m.get("Queue", "")
        paused = m.get("Paused", "").lower() in ("true", "yes", "1")
        found = False
        for name, members in self.queues.items():
            if (not queue or queue == name) and interface in members:
                members[interface] = Member(paused, m.get("Reason", "") if paused else "")
                found = True
        if not found:
            return f"Response: Error\r\n{aid}Message: Interface not found\r\n\r\n"
        word = "paused" if paused else "unpaused"
        return f"Response: Success\r\n{aid}Message: Interface {word} successfully\r\n\r\n"

    def _status(self, m: dict[str, str], aid: str) -> str:
        wanted = m.get("Member", "")
        out = [f"Response: Success\r\n{aid}EventList: start\r\nMessage: Queue status will follow\r\n\r\n"]
        items = 0
        for name, members in self.queues.items():
            out.append(f"Event: QueueParams\r\nQueue: {name}\r\nMax: 0\r\nStrategy: ringall\r\n{aid}\r\n")
            items += 1
            for interface, member in members.items():
                if wanted and wanted != interface:
                    continue
                out.append(
                    f"Event: QueueMember\r\nQueue: {name}\r\nName: {interface}\r\nLocation: {interface}\r\n"
                    f"StateInterface: {interface}\r\nMembership: static\r\nPenalty: 0\r\n"
                    f"CallsTaken: 0\r\nLastCall: 0\r\nLastPause: 0\r\nLoginTime: 0\r\nInCall: 0\r\n"
                    f"Status: 1\r\nPaused: {int(member.paused)}\r\nPausedReason: {member.reason}\r\n"
                    f"Wrapuptime: 0\r\n{aid}\r\n")
                items += 1
        out.append(f"Event: QueueStatusComplete\r\n{aid}EventList: Complete\r\nListItems: {items}\r\n\r\n")
        return "".join(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
