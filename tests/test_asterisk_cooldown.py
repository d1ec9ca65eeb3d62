"""The cool-down on a real Asterisk 22: QueueMemberPause events when the agent is paused and
unpaused, a restart of `calmline serve` in the middle, a manual unpause, AMI down then back.

The lab's queues have `setinterfacevar = yes` and the one agent is a member of two queues
(`support`, `support-senior`), so each pause or unpause shows as two QueueMemberPause events.
calmline reaches AMI through a TCP relay in this process, so AMI can go down for calmline
alone while the test keeps watching the events.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
from asterisk_lab import AMI_PORT, caller_linkedid

pytestmark = pytest.mark.asterisk

IFACE = "Local/queueagent@sim-agent/n"
REASON = "calmline cool-down"
SECONDS = 12


class Relay:
    """A TCP relay to the lab's AMI: `stop()` makes AMI unreachable for whoever uses it."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.listener.close()
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", AMI_PORT))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        if self._server is not None:
            try:
                self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it
            except OSError:
                pass
            self._server.close()
            self._server = None
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass
        self._conns = []


@pytest.fixture(scope="module")
def cooled(lab):
    relay = Relay()
    relay.start()
    extra = (f'\n[ami]\nport = {relay.port}\nusername = "test"\ntimeout = 3.0\n\n'
             f'[cooldown]\nenabled = true\nseconds = {SECONDS}\npoll_seconds = 0.2\nretry_seconds = 1.0\n')
    lab.start_service(extra)
    try:
        yield lab, relay, extra
    finally:
        relay.stop()
        lab.start_service("")  # the other lab tests run without cool-downs


def pauses(lab, mark):
    return [e for e in lab.ami.since(mark) if e.get("Event") == "QueueMemberPause" and e.get("Interface") == IFACE]


def wait_pauses(lab, mark, paused: str, count: int = 2, timeout: float = 40.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in pauses(lab, mark) if e.get("Paused") == paused]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {count} QueueMemberPause Paused={paused} within {timeout}s: {pauses(lab, mark)}")


def end_queue_call(lab, scen: str) -> int:
    return lab.originate(scen, exten="200", keys="*9", caller_hold=40, agent_hold=40)


def trail(lab, event: str, **match) -> list[dict]:
    return [e for e in lab.audit_events() if e.get("event") == event
            and all(e.get(k) == v for k, v in match.items())]


def test_end_on_a_queue_call_pauses_the_agent_in_both_queues_then_unpauses_on_time(cooled):
    lab, _relay, _ = cooled
    mark = end_queue_call(lab, "cooldownend")
    paused = wait_pauses(lab, mark, "1")
    paused_at = time.monotonic()
    assert sorted(e["Queue"] for e in paused) == ["support", "support-senior"]
    assert {e["PausedReason"] for e in paused} == {REASON}
    unpaused = wait_pauses(lab, mark, "0", timeout=SECONDS + 20)
    took = time.monotonic() - paused_at
    assert sorted(e["Queue"] for e in unpaused) == ["support", "support-senior"]
    assert SECONDS - 1.5 <= took <= SECONDS + 3, took
    print(f"\nlab: paused in {sorted(e['Queue'] for e in paused)}, unpaused {took:.1f}s later (seconds = {SECONDS})")
    linkedid = caller_linkedid(lab.ami.since(mark))
    scheduled = trail(lab, "step", step="cooldown_scheduled", linkedid=linkedid)
    assert scheduled and scheduled[0]["interface"] == IFACE and scheduled[0]["trigger"] == "end"
    assert trail(lab, "cooldown_paused", linkedid=linkedid)
    assert trail(lab, "cooldown_unpaused", linkedid=linkedid)
    lab.ami.wait_idle(mark, timeout=40)


def test_a_dial_call_is_not_paused_and_the_trail_says_why(cooled):
    lab, _relay, _ = cooled
    mark = lab.originate("cooldowndial", exten="100", keys="*9", caller_hold=40, agent_hold=40)
    events = lab.ami.wait_idle(mark, timeout=40)
    time.sleep(1.0)
    assert pauses(lab, mark) == []
    linkedid = caller_linkedid(events)
    step = trail(lab, "step", step="cooldown_not_started", linkedid=linkedid)
    assert step and "MEMBERINTERFACE is unset" in step[0]["reason"]


def test_a_restart_during_the_cooldown_still_unpauses_on_time(cooled):
    lab, _relay, extra = cooled
    mark = end_queue_call(lab, "cooldownkill")
    wait_pauses(lab, mark, "1")
    paused_at = time.monotonic()
    os.kill(lab.service.pid, signal.SIGKILL)
    lab.service.wait(10)
    lab.service = None
    time.sleep(2)
    lab.start_service(extra)
    unpaused = wait_pauses(lab, mark, "0", timeout=SECONDS + 20)
    took = time.monotonic() - paused_at
    assert len(unpaused) == 2 and SECONDS - 1.5 <= took <= SECONDS + 3, took
    print(f"\nlab: killed and restarted mid cool-down; unpaused {took:.1f}s after the pause (seconds = {SECONDS})")
    lab.ami.wait_idle(mark, timeout=40)


@pytest.mark.slow
def test_a_restart_after_the_due_time_unpauses_at_once(cooled):
    lab, _relay, extra = cooled
    mark = end_queue_call(lab, "cooldownlate")
    wait_pauses(lab, mark, "1")
    os.kill(lab.service.pid, signal.SIGKILL)
    lab.service.wait(10)
    lab.service = None
    time.sleep(SECONDS + 2)
    assert [e for e in pauses(lab, mark) if e.get("Paused") == "0"] == [], "nobody unpaused while calmline was down"
    restarted = time.monotonic()
    lab.start_service(extra)
    wait_pauses(lab, mark, "0", timeout=15)
    print(f"\nlab: restarted after the due time; unpaused {time.monotonic() - restarted:.1f}s after the restart")
    assert time.monotonic() - restarted < 6
    late = trail(lab, "cooldown_unpaused")[-1]
    assert late["late_seconds"] >= 2
    lab.ami.wait_idle(mark, timeout=40)


@pytest.mark.slow  # its fake-Asterisk twin runs every time
def test_an_agent_who_unpauses_by_hand_is_not_paused_again_nor_unpaused(cooled):
    lab, _relay, _ = cooled
    mark = end_queue_call(lab, "cooldownhand")
    wait_pauses(lab, mark, "1")
    # The agent unpauses in support (as a phone's feature code would, through app_queue).
    response = lab.ami.manager.send_action({"Action": "QueuePause", "Interface": IFACE, "Paused": "false",
                                            "Queue": "support"})
    assert response.get_header("Response") == "Success"
    mine = wait_pauses(lab, mark, "0", count=1)
    assert [e["Queue"] for e in mine] == ["support"]
    unpaused = wait_pauses(lab, mark, "0", count=2, timeout=SECONDS + 20)
    time.sleep(2)
    events = pauses(lab, mark)
    assert [e["Queue"] for e in events if e["Paused"] == "0"] == ["support", "support-senior"]
    assert [e["Queue"] for e in events if e["Paused"] == "1"].count("support") == 1, "not paused again"
    linkedid = caller_linkedid(lab.ami.since(mark))
    done = trail(lab, "cooldown_unpaused", linkedid=linkedid)[0]
    assert done["queues"] == ["support-senior"]
    assert done["left_alone"] == {"support": "unpaused already (by hand)"}
    assert unpaused
    lab.ami.wait_idle(mark, timeout=40)


@pytest.mark.slow  # its fake-Asterisk twin runs every time
def test_ami_down_is_retried_until_it_is_back(cooled):
    lab, relay, _ = cooled
    relay.stop()
    try:
        mark = end_queue_call(lab, "cooldownamidown")
        deadline = time.monotonic() + 40
        while not trail(lab, "cooldown_ami_failed") and time.monotonic() < deadline:
            time.sleep(0.3)
        failed = trail(lab, "cooldown_ami_failed")
        assert failed and failed[-1]["action"] == "pause"
        assert pauses(lab, mark) == []
    finally:
        relay.start()
    back = time.monotonic()
    wait_pauses(lab, mark, "1", timeout=15)
    print(f"\nlab: AMI back; paused {time.monotonic() - back:.1f}s later")
    assert trail(lab, "cooldown_ami_back")
    wait_pauses(lab, mark, "0", timeout=SECONDS + 20)
    lab.ami.wait_idle(mark, timeout=40)


def test_check_logs_in_to_ami_and_reads_setinterfacevar_from_queues_conf(cooled):
    lab, _relay, _ = cooled
    ok = lab.calmline("check", "--no-port", check=False)
    assert "ok: AMI login to 127.0.0.1:" in ok.stdout and "as 'test' works" in ok.stdout, ok.stdout
    assert "every queue in queues.conf has setinterfacevar = yes (2 queues)" in ok.stdout, ok.stdout
    bad = lab.calmline("check", "--no-port", check=False, env={"CALMLINE_AMI_SECRET": "wrong"})
    assert bad.returncode == 1
    assert "problem: ami.host/ami.port/ami.username: AMI login to" in bad.stdout
    assert "as 'test' failed" in bad.stdout, bad.stdout
