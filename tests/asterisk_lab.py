"""A real Asterisk 22 on loopback, wired with the files `calmline dialplan` renders.

The lab call flow (from ../shared/asterisk/lab-extensions.conf): Local channels play the
caller and the agent; the agent's side answers and presses keys with SendDTMF; a queue
`support` whose member is such an agent. Calls are originated and watched over AMI with
pyst2's `asterisk.manager`; calmline runs as its own process, started by its own CLI.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
import subprocess
import sys
import threading
import time
from pathlib import Path

from asterisk.manager import Manager

SHARED = Path(__file__).resolve().parents[2] / "shared" / "asterisk"
PREFIX = Path(os.environ.get("ASTERISK_PREFIX", "/opt/asterisk-22"))
BINARY = PREFIX / "sbin" / "asterisk"
SOUNDS = PREFIX / "var" / "lib" / "asterisk" / "sounds"
REPO = Path(__file__).resolve().parents[1]
AMI_PORT = 15038
# One lab Asterisk per machine: its AMI port is fixed, so a second pytest session would
# otherwise talk to the first one's Asterisk (and its calmline) without noticing.
LOCK_PATH = Path(tempfile.gettempdir()) / "calmline-asterisk-lab.lock"
LOCK_WAIT = float(os.environ.get("CALMLINE_LAB_LOCK_WAIT", "900"))

LAB_EXTENSIONS = r"""
[general]
static=yes
writeprotect=no

#include calmline-extensions.conf

[support]
exten => 100,1,NoOp(inbound call for scenario ${SCEN})
 same => n,Set(CALLERID(num)=+15551234567)
 same => n,Set(CALLERID(name)=${IF($["${CALLER_NAME}" = ""]?Angry "Bob" Smith:${CALLER_NAME})})
; g: go on after the agent hangs up, so the after-dial event shows the caller's leg survived
 same => n,Dial(Local/${SCEN}@sim-agent/n,30,gb(calmline-agent^s^1))
 same => n,UserEvent(CalmlineLab,Where: after-dial,Scen: ${SCEN},DialStatus: ${DIALSTATUS},Warnings: ${CALMLINE_WARNINGS},Status: ${CALMLINE_STATUS})
 same => n,Hangup()

exten => 200,1,NoOp(queue call for scenario ${SCEN})
 same => n,Set(CALLERID(num)=+15551234567)
 same => n,Set(CALLERID(name)=Angry "Bob" Smith)
; c: go on after the agent hangs up (Queue's twin of Dial's g)
 same => n,Queue(support,cb(calmline-agent^s^1),,,60)
 same => n,UserEvent(CalmlineLab,Where: after-queue,Scen: ${SCEN},QueueStatus: ${QUEUESTATUS},Warnings: ${CALMLINE_WARNINGS},Status: ${CALMLINE_STATUS})
 same => n,Hangup()

; An admin's mistake, kept on purpose: b() in Queue's THIRD argument (the URL) is ignored,
; so the agent's leg never gets DYNAMIC_FEATURES and the codes go to the caller as tones.
exten => 201,1,NoOp(misconfigured queue call for scenario ${SCEN})
 same => n,Set(CALLERID(num)=+15551234567)
 same => n,Queue(support,c,b(calmline-agent^s^1),,60)
 same => n,UserEvent(CalmlineLab,Where: after-queue,Scen: ${SCEN},QueueStatus: ${QUEUESTATUS},Warnings: ${CALMLINE_WARNINGS},Status: ${CALMLINE_STATUS})
 same => n,Hangup()

; The inbound route with calmline's lookup: the caller's number is the scenario's, then the
; rendered example route (lookup, then the normal or the senior queue) takes over. A hangup
; handler reports what the lookup left on the caller's channel.
exten => 300,1,NoOp(lookup call for scenario ${SCEN})
 same => n,Set(CALLERID(num)=${LOOKUP_NUM})
 same => n,Set(CHANNEL(hangup_handler_push)=lab-lookup-report,s,1)
 same => n,Goto(calmline-example-inbound,300,1)

; An escalated queue call from the scenario's number (the agent presses KEYS).
exten => 301,1,NoOp(queue call from ${LOOKUP_NUM} for scenario ${SCEN})
 same => n,Set(CALLERID(num)=${LOOKUP_NUM})
 same => n,Queue(support,cb(calmline-agent^s^1),,,60)
 same => n,Hangup()

[lab-lookup-report]
exten => s,1,UserEvent(CalmlineLab,Where: lookup-report,Scen: ${SCEN},Escalations: ${CALMLINE_CALLER_ESCALATIONS},Last: ${CALMLINE_CALLER_LAST},Flag: ${CALMLINE_CALLER_FLAG},AgiStatus: ${AGISTATUS})
 same => n,Return()

[sim-caller]
exten => caller,1,Answer()
 same => n,GotoIf($["${CALLER_RECORD}" != ""]?record)
 same => n,Wait(${CALLER_HOLD})
 same => n,Hangup()
; for the listen-in tests: record what the caller hears (the audio the call sends this half),
; and send silence meanwhile, as a phone's RTP would (ChanSpy mixes into frames that flow)
 same => n(record),MixMonitor(${CALLER_RECORD}-both.wav,r(${CALLER_RECORD}-heard.wav))
 same => n,Set(UNTIL=$[${EPOCH} + ${CALLER_HOLD}])
 same => n(silent),Playback(silence/1)
 same => n,GotoIf($[${EPOCH} < ${UNTIL}]?silent)
 same => n,Hangup()

[sim-agent]
exten => _X.,1,Hangup()
exten => _[a-z].,1,Answer()
 same => n,ExecIf($["${AGENT_RECORD}" != ""]?MixMonitor(${AGENT_RECORD}-both.wav,r(${AGENT_RECORD}-heard.wav)))
 same => n,Wait(1)
 same => n,SendDTMF(${KEYS},250)
 same => n,GotoIf($["${AGENT_RECORD}" != ""]?silent)
 same => n,Wait(${AGENT_HOLD})
 same => n(hold),NoOp()
; a marker the tests order against: Asterisk does not order the Hangup events of the two
; Local halves against the caller's BridgeLeave, but this event comes before all of them
 same => n,UserEvent(CalmlineLab,Where: agent-hangs-up,Scen: ${EXTEN})
 same => n,Hangup()
 same => n(silent),Set(UNTIL=$[${EPOCH} + ${AGENT_HOLD}])
 same => n(again),Playback(silence/1)
 same => n,GotoIf($[${EPOCH} < ${UNTIL}]?again:hold)

; the admin's phone, re-recording a prompt: speaks (a stock prompt) after the tone, then #
[sim-admin]
exten => record,1,Answer()
 same => n,Wait(6)
 same => n,Playback(vm-goodbye)
 same => n,SendDTMF(#)
 same => n,Wait(12)
 same => n,Hangup()

[sim-targets]
exten => answers,1,Answer()
 same => n,UserEvent(CalmlineLab,Where: target-answered,Target: ${EXTEN},CallerName: ${CALLERID(name)},Reason: ${CALMLINE_XFER_REASON})
 same => n,Wait(8)
 same => n,Hangup()
exten => _X.,1,Answer()
 same => n,UserEvent(CalmlineLab,Where: target-answered,Target: ${EXTEN},CallerName: ${CALLERID(name)})
 same => n,Wait(8)
 same => n,Hangup()
exten => noanswer,1,Wait(30)
; the supervisor summoned to listen in; GLOBAL(LISTENER) picks how (set over AMI by the tests):
; "noanswer" lets it ring, "barge" presses 6 (ChanSpy's barge key) after speaking once
exten => listener,1,GotoIf($["${LISTENER}" = "noanswer"]?ring)
 same => n,Answer()
 same => n,UserEvent(CalmlineLab,Where: listener-answered,Listener: ${CHANNEL})
 same => n,Wait(1)
 same => n,Playback(calmline/whisper-supervisor)
 same => n,GotoIf($["${LISTENER}" != "barge"]?bye)
 same => n,SendDTMF(6)
 same => n,UserEvent(CalmlineLab,Where: listener-barged)
 same => n,Playback(calmline/whisper-supervisor)
 same => n(bye),Wait(1)
 same => n,UserEvent(CalmlineLab,Where: listener-hangs-up)
 same => n,Hangup()
 same => n(ring),Wait(30)
"""

# The lab's queues: `setinterfacevar = yes` puts MEMBERINTERFACE on both legs (the cool-down
# reads it); the one agent is a member of both, so a cool-down pauses it twice.
LAB_QUEUES = """
[general]
[support]
strategy = ringall
timeout = 15
setinterfacevar = yes
member => Local/queueagent@sim-agent/n

[support-senior]
strategy = ringall
timeout = 15
setinterfacevar = yes
member => Local/queueagent@sim-agent/n
"""

# Asterisk's own records of an ended call, as files the tests read.
LAB_CDR = """
[cdr_calmline.csv]
format = dsv
fields = UniqueID,LinkedID,Channel,DstChannel,Disposition,UserField
"""
LAB_CEL = """
[cel_calmline.csv]
format = dsv
fields = EventType,UserDefType,UniqueID,LinkedID,ChanName,EventExtra
"""


class Inbox:
    """A real SMTP server on loopback (aiosmtpd) that keeps what it receives."""

    def __init__(self, port: int) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[tuple[list[str], bytes]] = []
        self.port = port
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        self.messages.append((list(envelope.rcpt_tos), envelope.content))
        return "250 OK queued"

    def wait_for(self, count: int, timeout: float = 15.0) -> list[tuple[list[str], bytes]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.messages) < count:
            time.sleep(0.05)
        return list(self.messages)

    def stop(self) -> None:
        self._controller.stop()


LAB_FEATURES = """
[general]
featuredigittimeout = 1000

#include calmline-features.conf
"""


def available() -> bool:
    return BINARY.exists()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class LabLock:
    """An exclusive lock on the machine's one lab Asterisk, waited for (not stolen)."""

    def __init__(self, path: Path = LOCK_PATH, wait: float = LOCK_WAIT):
        self.path = path
        self.wait = wait
        self._file = None

    def acquire(self) -> None:
        self._file = self.path.open("a+")
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._file.close()
                    self._file = None
                    raise RuntimeError(
                        f"another test session holds the lab Asterisk ({self.path}) for over {self.wait:.0f}s"
                    ) from None
                time.sleep(0.5)
        # The previous holder has stopped its Asterisk; a port still open means a stray one.
        deadline = time.monotonic() + 10
        while _port_open(AMI_PORT):
            if time.monotonic() > deadline:
                self.release()
                raise RuntimeError(
                    f"something already listens on the lab's AMI port 127.0.0.1:{AMI_PORT} "
                    f"(a stray Asterisk?); stop it, the lab would talk to it instead of its own"
                )
            time.sleep(0.2)

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AMI:
    """pyst2's AMI client with every event kept, so tests can wait for and inspect them."""

    def __init__(self) -> None:
        self.manager = Manager()
        self.events: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def connect(self) -> None:
        deadline = time.monotonic() + 15
        while True:
            try:
                self.manager.connect("127.0.0.1", AMI_PORT)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.manager.login("test", "test")
        self.manager.register_event("*", self._on_event)

    def _on_event(self, event, _manager) -> None:
        with self._lock:
            self.events.append(dict(event.headers))

    def mark(self) -> int:
        with self._lock:
            return len(self.events)

    def since(self, mark: int) -> list[dict[str, str]]:
        with self._lock:
            return list(self.events[mark:])

    def wait_for(self, predicate, mark: int, timeout: float = 20.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.since(mark):
                if predicate(event):
                    return event
            time.sleep(0.05)
        raise AssertionError(f"no matching AMI event within {timeout}s")

    def wait_idle(self, mark: int, timeout: float = 30.0) -> list[dict[str, str]]:
        """Wait until every channel created since `mark` has hung up; return the events."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.since(mark)
            created = {e.get("Uniqueid") for e in events if e.get("Event") == "Newchannel"}
            gone = {e.get("Uniqueid") for e in events if e.get("Event") == "Hangup"}
            if created and created <= gone:
                time.sleep(0.3)
                return self.since(mark)
            time.sleep(0.1)
        raise AssertionError("the call did not end in time")

    def command(self, text: str) -> str:
        response = self.manager.command(text)
        return response.response if isinstance(response.response, str) else "\n".join(response.response)

    def close(self) -> None:
        try:
            self.manager.close()
        except Exception:
            pass


class Lab:
    """Asterisk + calmline for one test session."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.run_dir = workdir / "asterisk"
        self.conf_dir = workdir / "conf"
        self.port = free_port()
        self.service: subprocess.Popen | None = None
        self.ami = AMI()
        self.config_path = workdir / "calmline.toml"
        self.audit_db = workdir / "audit.sqlite3"
        self.service_log = workdir / "calmline.log"
        self.smtp_port = free_port()
        self.smtp: Inbox | None = None
        self.lock = LabLock()

    def config_text(self, extra: str = "") -> str:
        return (
            f'[server]\nport = {self.port}\n\n'
            f'[store]\nurl = "sqlite:///{self.audit_db}"\n\n'
            f'[dialplan]\nservice_url = "agi://127.0.0.1:{self.port}"\nmoh_class = "default"\n\n'
            f'[prompts]\nsounds_dir = "{SOUNDS}"\n\n'
            f'[transfer.supervisor]\ncode = "*3"\ndial = "Local/answers@sim-targets"\n'
            f'prompt = "calmline/transfer-supervisor"\nreason = "abusive caller"\n'
            f'whisper = "calmline/whisper-supervisor"\n\n'
            f'[transfer.colleague]\ncode = "*4"\ndial = "Local/noanswer@sim-targets"\nring_seconds = 5\n'
            f'prompt = "calmline/transfer-colleague"\nreason = "needs another agent"\n'
            f'fallback = "dial"\nfallback_dial = "Local/2002@sim-targets"\n\n'
            f'[transfer.colleague_keyed]\ndial_template = "Local/{{ext}}@sim-targets"\n\n'
            f'[listen]\ndial = "Local/listener@sim-targets"\nring_seconds = 5\n\n'
            f'[mail]\nport = {self.smtp_port}\n'
            f'team_address = "team@example.com"\nretry_initial_seconds = 1.0\n'
            + extra
        )

    def calmline(self, *args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "calmline", "-c", str(self.config_path), *args],
            capture_output=True, text=True, check=check, cwd=self.workdir,
            env={**os.environ, "CALMLINE_AMI_SECRET": "test", **(env or {})},
        )

    def start(self, extra_config: str = "") -> None:
        self.lock.acquire()
        try:
            self._start(extra_config)
        except BaseException:
            self.stop()
            raise

    def _start(self, extra_config: str = "") -> None:
        for sub in ("cdr-custom", "cel-custom"):  # cdr_custom/cel_custom write only into existing dirs
            (self.run_dir / "log" / sub).mkdir(parents=True, exist_ok=True)
        self.smtp = Inbox(self.smtp_port)
        self.config_path.write_text(self.config_text(extra_config))
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.calmline("dialplan", "--output-dir", str(self.conf_dir))
        self.calmline("prompts", "install")
        (self.conf_dir / "extensions.conf").write_text(LAB_EXTENSIONS)
        (self.conf_dir / "features.conf").write_text(LAB_FEATURES)
        modules = (SHARED / "base" / "modules.conf").read_text()
        (self.conf_dir / "modules.conf").write_text(
            modules.rstrip() + "\nload => func_export.so\nload => app_originate.so\nload => app_mixmonitor.so\n")
        (self.conf_dir / "cdr_custom.conf").write_text(LAB_CDR)
        (self.conf_dir / "queues.conf").write_text(LAB_QUEUES)
        (self.conf_dir / "cel_custom.conf").write_text(LAB_CEL)
        subprocess.run(["bash", str(SHARED / "run-asterisk.sh"), "start", str(self.run_dir), str(self.conf_dir)],
                       check=True, capture_output=True, env={**os.environ, "PREFIX": str(PREFIX)})
        self.ami.connect()
        self.start_service()

    def start_service(self, extra_config: str | None = None) -> None:
        if extra_config is not None:
            self.config_path.write_text(self.config_text(extra_config))
        self.stop_service()
        log = self.service_log.open("a")
        self.service = subprocess.Popen(
            [sys.executable, "-m", "calmline", "-c", str(self.config_path), "serve"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
            env={**os.environ, "CALMLINE_AMI_SECRET": "test"},
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if self.service.poll() is not None:
                    raise RuntimeError(f"calmline serve exited: {self.service_log.read_text()[-2000:]}")
                time.sleep(0.1)
        raise RuntimeError("calmline serve did not start listening")

    def stop_service(self) -> None:
        if self.service is not None and self.service.poll() is None:
            self.service.terminate()
            self.service.wait(10)
        self.service = None

    def originate(self, scen: str, *, exten: str = "100", keys: str = "*1", caller_hold: int = 14,
                  agent_hold: int = 14, extra: dict[str, str] | None = None) -> int:
        mark = self.ami.mark()
        variables = {"SCEN": scen, "CALLER_HOLD": caller_hold, "__KEYS": keys, "__AGENT_HOLD": agent_hold}
        variables.update(extra or {})
        response = self.ami.manager.originate(
            "Local/caller@sim-caller/n", exten, context="support", priority="1",
            run_async=True, variables=variables,
        )
        assert response.get_header("Response") == "Success", response.headers
        return mark

    def audit_events(self) -> list[dict]:
        from calmline.audit.store import read_events
        from calmline.store import Database

        time.sleep(0.2)
        return read_events(Database(f"sqlite:///{self.audit_db}"), limit=100000)

    def cli(self, command: str) -> str:
        result = subprocess.run(["bash", str(SHARED / "run-asterisk.sh"), "cli", str(self.run_dir), command],
                                capture_output=True, text=True, env={**os.environ, "PREFIX": str(PREFIX)})
        return result.stdout

    def stop(self) -> None:
        if self.smtp is not None:
            self.smtp.stop()
            self.smtp = None
        self.stop_service()
        self.ami.close()
        subprocess.run(["bash", str(SHARED / "run-asterisk.sh"), "stop", str(self.run_dir)],
                       capture_output=True, env={**os.environ, "PREFIX": str(PREFIX)})
        deadline = time.monotonic() + 10
        while _port_open(AMI_PORT) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.lock.release()


def caller_linkedid(events: list[dict[str, str]]) -> str:
    """The linkedid of the call the lab's simulated caller placed, from AMI events."""
    for e in events:
        if e.get("Event") == "Newchannel" and e.get("Channel", "").startswith("Local/caller@sim-caller"):
            return e["Linkedid"]
    raise AssertionError("no caller channel seen")


def copy_lab_log(lab: Lab, dest: Path) -> None:
    log = lab.run_dir / "log" / "full"
    if log.exists():
        shutil.copy(log, dest)
