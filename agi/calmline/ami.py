"""Asterisk's manager interface through pyst2's `asterisk.manager`, bounded in time.

pyst2 blocks without a timeout (connect, every action, close), so each piece of work runs
in its own daemon thread that the caller waits for at most `[ami] timeout`; a stalled
Asterisk becomes an `AMIUnavailable`, which the cool-down retries.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from calmline.config import AMIConfig
from calmline.errors import CalmlineError

T = TypeVar("T")


class AMIUnavailable(CalmlineError):
    """AMI could not be reached, refused the login, or did not answer in time."""

    outcome = "ami_unavailable"


@dataclass(frozen=True)
class Membership:
    """One queue the interface is a member of, as QueueStatus reports it."""

    queue: str
    paused: bool
    reason: str


class Session:
    """A logged-in pyst2 Manager: the actions the cool-down needs, answered synchronously."""

    def __init__(self, manager: Any):
        self._manager = manager

    def _action(self, fields: dict[str, str]) -> Any:
        response = self._manager.send_action(dict(fields))
        if response.get_header("Response") == "Error":
            raise AMIUnavailable(f"AMI refused {fields['Action']}: {response.get_header('Message')}")
        return response

    def queue_pause(self, interface: str, paused: bool, reason: str, queue: str | None = None) -> None:
        """Pause (or unpause) `interface` in `queue`, or in every queue it belongs to."""
        fields = {"Action": "QueuePause", "Interface": interface,
                  "Paused": "true" if paused else "false", "Reason": reason}
        if queue:
            fields["Queue"] = queue
        self._action(fields)

    def memberships(self, interface: str) -> list[Membership]:
        """The queues `interface` is a member of, with its pause state and reason in each.

        Asterisk answers QueueStatus with "Queue status will follow", then QueueMember events,
        then QueueStatusComplete; pyst2 gathers all of that into the one response (it waits
        for "StatusComplete" after "status will follow"), so the members are read from its lines.
        """
        action_id = f"calmline-{uuid.uuid4().hex}"
        response = self._action({"Action": "QueueStatus", "Member": interface, "ActionID": action_id})
        found: list[Membership] = []
        for block in _blocks(response.response):
            if block.get("Event") == "QueueMember" and block.get("ActionID") == action_id:
                found.append(Membership(block.get("Queue", ""), block.get("Paused") == "1",
                                        block.get("PausedReason", "")))
        return found

    def get_config(self, filename: str) -> dict[str, list[str]]:
        """Categories of an Asterisk config file (GetConfig), each with its `name=value` lines."""
        response = self._action({"Action": "GetConfig", "Filename": filename})
        categories: dict[str, str] = {}
        lines: dict[str, list[str]] = {}
        for key, value in response.headers.items():
            if key.startswith("Category-"):
                categories[key.removeprefix("Category-")] = value
        for raw in response.response:
            key, sep, value = raw.rstrip("\r\n").partition(": ")
            if sep and key.startswith("Line-"):
                _line, number, _index = key.split("-", 2)
                lines.setdefault(categories.get(number, number), []).append(value)
        return {name: lines.get(name, []) for name in categories.values()}


def _blocks(lines: list[str]) -> list[dict[str, str]]:
    """AMI messages (header blocks separated by empty lines) from pyst2's raw lines."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if current:
                blocks.append(current)
            current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current.setdefault(key.strip(), value.strip())
    if current:
        blocks.append(current)
    return blocks


def run(cfg: AMIConfig, secret: str | None, work: Callable[[Session], T]) -> T:
    """Log in, run `work`, log off; raise AMIUnavailable for anything that goes wrong or
    takes longer than `cfg.timeout` (the thread is abandoned and its socket closed)."""
    if not cfg.username:
        raise AMIUnavailable("[ami] username is not set")
    if secret is None:
        raise AMIUnavailable(f"the AMI secret is not set: {cfg.secret_env} is not in the environment")
    from asterisk.manager import Manager

    manager = Manager()
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            manager.connect(cfg.host, cfg.port)
            manager.login(cfg.username, secret)
            manager.send_action({"Action": "Events", "EventMask": "off"})  # answers only
            result["value"] = work(Session(manager))
        except BaseException as exc:  # handed to the waiting thread below
            result["error"] = exc
        finally:
            try:
                manager.close()  # logs off itself
            except Exception:
                pass

    thread = threading.Thread(target=target, name="calmline-ami", daemon=True)
    thread.start()
    thread.join(cfg.timeout * 2)
    where = f"{cfg.host}:{cfg.port}"
    if thread.is_alive():
        _abandon(manager)
        raise AMIUnavailable(f"AMI at {where} did not answer within {cfg.timeout * 2:g}s")
    if "error" in result:
        error = result["error"]
        from asterisk.manager import ManagerAuthException

        if isinstance(error, AMIUnavailable):
            raise AMIUnavailable(f"AMI at {where}: {error}") from None
        if isinstance(error, ManagerAuthException):
            raise AMIUnavailable(f"AMI login to {where} as {cfg.username!r} failed ({error})") from None
        text = " ".join(str(error).split()) or type(error).__name__
        raise AMIUnavailable(f"AMI at {where} failed: {text}") from None
    return result["value"]


def _abandon(manager: Any) -> None:
    """Wake a pyst2 thread that waits for an answer that will not come."""
    try:
        manager._connected.clear()
        manager._response_queue.put(None)
        if manager._sock is not None:
            manager._sock.close()
    except Exception:
        pass
