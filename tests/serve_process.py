"""`calmline serve` as a real child process, with its JSON lines read as they come."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

AGI = Path(__file__).resolve().parents[1] / "agi"


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(AGI) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class ServeProcess:
    """Runs `argv` (by default `python -m calmline -c CONFIG serve`) and collects its output."""

    def __init__(self, config: Path | None = None, *, argv: list[str] | None = None, cwd: Path | None = None):
        if argv is None:
            argv = [sys.executable, "-m", "calmline", "-c", str(config), "serve", "--no-uvloop"]
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8",
        )
        self.events: list[dict] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, stream, is_stdout: bool) -> None:
        for line in stream:
            with self._changed:
                if is_stdout:
                    try:
                        self.events.append(json.loads(line))
                    except ValueError:
                        self.stderr.append("stdout: " + line)
                else:
                    self.stderr.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, event: str, *, after: int = 0, timeout: float = 15.0, **fields) -> dict:
        """The first event named `event` (with `fields`) at index `after` or later."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for e in self.events[after:]:
                    if e.get("event") == event and all(e.get(k) == v for k, v in fields.items()):
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self._alive_readers():
                    raise AssertionError(
                        f"no {event} event within {timeout}s; stderr: {self.stderr[-10:]}; "
                        f"events: {[e.get('event') for e in self.events[-20:]]}"
                    )
                self._changed.wait(min(left, 0.2))

    def wait_for_stderr(self, text: str, *, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.stderr:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no stderr line with {text!r}; stderr: {self.stderr[-10:]}")
                self._changed.wait(min(left, 0.2))

    def _alive_readers(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    @property
    def port(self) -> int:
        return self.wait_for("service_started")["port"]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        for thread in self._threads:
            thread.join(5)
        return code

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
