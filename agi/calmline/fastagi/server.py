"""The FastAGI listener: accepts Asterisk's connections and hands each to a `Session`.

It enforces the limits that keep one bad client from hurting the others: an address
allowlist, a cap on concurrent sessions overall and per peer address, a line-length cap (the
stream's buffer limit) and the timeouts the session's stream applies.

It runs its own accept loop rather than asyncio's: that one (Python 3.11) keeps calling
accept() after EMFILE, logging a traceback and scheduling a restart each time, up to the
backlog per wake-up, which floods the log when descriptors run out. Here accepting pauses
for `ACCEPT_PAUSE` seconds and the trail says so once per episode.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import socket
import struct
import time
from collections.abc import Callable

from calmline.audit.trail import AuditTrail
from calmline.config import Config
from calmline.fastagi.contract import Registry
from calmline.fastagi.protocol import AGIStream
from calmline.fastagi.session import FINISH_TIMEOUT, Session

ACCEPT_PAUSE = 0.5  # seconds without accepting after the system refused a descriptor
_ACCEPT_BATCH = 64  # connections taken per wake-up, so a flood cannot starve the sessions
_BACKLOG = 1024
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, leaves no TIME_WAIT


def listen(host: str, port: int) -> list[socket.socket]:
    """Non-blocking listening sockets for `server.host`.

    `::` is explicitly dual-stack (IPV6_V6ONLY off), so IPv4 peers are served too and arrive
    as `::ffff:a.b.c.d`, which the allowlist reads as the IPv4 address; any other IPv6
    address listens on IPv6 only. A name that resolves to several addresses gets a socket
    on each, all on the same port.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple] = set()
    try:
        for family, kind, proto, _name, address in infos:
            if address[:2] in seen:
                continue
            seen.add(address[:2])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # Dual-stack only when no IPv4 socket is bound beside it (host "" gives both).
                dual = ipaddress.ip_address(address[0].split("%")[0]).is_unspecified and not any(
                    info[0] == socket.AF_INET for info in infos)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(f"{host!r} resolves to no address")
    return sockets


def peer_host(host: str) -> str:
    """The address a peer is known by: an IPv4-mapped IPv6 address as plain IPv4."""
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return host


class FastAGIServer:
    """Serve FastAGI sessions until closed; `close()` lets running sessions finish."""

    def __init__(self, config: Config, registry: Registry, audit: AuditTrail):
        self._config = config
        self._registry = registry
        self._audit = audit
        self._allowed = config.server.allowed_networks()
        self._per_peer_limit = config.server.max_sessions_per_peer
        self._listeners: list[socket.socket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sessions: set[asyncio.Task] = set()
        self._per_peer: collections.Counter[str] = collections.Counter()
        self._paused_since: float | None = None  # set while an accept episode of errors lasts
        self._pauses = 0
        self._resume: asyncio.TimerHandle | None = None
        self._stopped: asyncio.Event | None = None
        # Observers (metrics): a session's action path (None if it named none) and outcome;
        # a refusal's reason. Their values come from config and code, never from a peer.
        self.on_session_end: Callable[[str | None, str], None] | None = None
        self.on_refused: Callable[[str], None] | None = None

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    def swap(self, config: Config, registry: Registry) -> None:
        """Serve new sessions with `config`; running sessions keep what they started with."""
        self._config = config
        self._registry = registry
        self._allowed = config.server.allowed_networks()
        self._per_peer_limit = config.server.max_sessions_per_peer

    async def start(self) -> tuple[str, int]:
        """Bind and listen; return the address actually bound (port 0 picks a free one)."""
        cfg = self._config.server
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._listeners = listen(cfg.host, cfg.port)
        self._start_accepting()
        host, port = self._listeners[0].getsockname()[:2]
        self._audit.event("server_listening", host=host, port=port, paths=self._registry.paths())
        return host, port

    def _start_accepting(self) -> None:
        self._resume = None
        for sock in self._listeners:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _stop_accepting(self) -> None:
        for sock in self._listeners:
            self._loop.remove_reader(sock.fileno())

    def _new_stream(self) -> AGIStream:
        cfg = self._config.server
        return AGIStream(answer_timeout=cfg.answer_timeout, max_line=cfg.max_line_bytes, loop=self._loop)

    async def serve_forever(self) -> None:
        assert self._stopped is not None, "start() first"
        await self._stopped.wait()

    async def close(self, grace: float = 30.0) -> None:
        """Stop accepting, wait up to `grace` seconds for running sessions, then cancel the
        rest and wait for them to record their end (each takes at most FINISH_TIMEOUT)."""
        if self._listeners:
            self._stop_accepting()
            for sock in self._listeners:
                sock.close()
            self._listeners = []
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        pending = set(self._sessions)
        if pending:
            self._audit.event("server_draining", sessions=len(pending), grace_s=grace)
            _done, still = await asyncio.wait(pending, timeout=grace)
            if still:
                for task in still:
                    task.cancel()
                await asyncio.wait(still, timeout=FINISH_TIMEOUT + 1.0)
                self._audit.problem("sessions_cancelled", sessions=len(still), grace_s=grace)
        if self._stopped is not None:
            self._stopped.set()
        self._audit.event("server_stopped")

    # --- accepting ---------------------------------------------------------------------

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: wait, do not spin
                self._pause_accepting(exc)
                return
            if self._paused_since is not None:
                self._audit.event(
                    "accepting_again", paused_s=round(time.monotonic() - self._paused_since, 3),
                    pauses=self._pauses, sessions=len(self._sessions),
                )
                self._paused_since = None
            self._admit(conn, address)

    def _pause_accepting(self, exc: OSError) -> None:
        self._stop_accepting()
        self._resume = self._loop.call_later(ACCEPT_PAUSE, self._start_accepting)
        self._pauses += 1
        if self._paused_since is None:
            self._paused_since = time.monotonic()
            self._pauses = 1
            self._audit.problem(
                "accepting_paused",
                error=exc.strerror or str(exc),
                sessions=len(self._sessions),
                retry_s=ACCEPT_PAUSE,
                hint="out of file descriptors or memory: raise LimitNOFILE (ulimit -n) or lower "
                     "server.max_sessions; `calmline check` compares the two",
            )

    def _refuse(self, conn: socket.socket, peer: str, reason: str, kind: str) -> None:
        self._audit.problem("connection_refused", peer=peer, reason=reason)
        if self.on_refused is not None:
            self.on_refused(kind)
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        except OSError:
            pass
        conn.close()

    def _allowed_peer(self, host: str) -> bool:
        if not self._allowed:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._allowed)

    def _admit(self, conn: socket.socket, address: tuple) -> None:
        host = peer_host(address[0])
        peer = f"{host}:{address[1]}"
        cfg = self._config.server
        if not self._allowed_peer(host):
            self._refuse(conn, peer, "address not in server.allow", "not_allowed")
            return
        if len(self._sessions) >= cfg.max_sessions:
            self._refuse(conn, peer, f"server.max_sessions ({cfg.max_sessions}) reached", "max_sessions")
            return
        if self._per_peer_limit is not None and self._per_peer[host] >= self._per_peer_limit:
            self._refuse(conn, peer, f"server.max_sessions_per_peer ({self._per_peer_limit}) reached",
                         "max_sessions_per_peer")
            return
        conn.setblocking(False)
        self._per_peer[host] += 1
        # Stays empty if the task is cancelled before it first runs; then holds its Session.
        started: list[Session | None] = []
        task = self._loop.create_task(self._serve(conn, peer, started))
        self._sessions.add(task)
        task.add_done_callback(
            lambda done: self._session_done(done, host, None if started else conn, started))

    async def _serve(self, conn: socket.socket, peer: str, started: list[Session | None]) -> str | None:
        started.append(None)  # from here on the transport (or the except below) closes conn
        try:
            _transport, stream = await self._loop.connect_accepted_socket(self._new_stream, conn)
        except OSError:
            conn.close()
            return None
        # The registry and config of this moment: a reload later does not change this session.
        session = started[0] = Session(stream, registry=self._registry, config=self._config,
                                       audit=self._audit, peer=peer)
        return await session.run()

    def _session_done(self, task: asyncio.Task, host: str, unstarted: socket.socket | None,
                      started: list[Session | None]) -> None:
        self._sessions.discard(task)
        if unstarted is not None:
            unstarted.close()  # cancelled before it ran: nothing else owns the socket
        left = self._per_peer[host] - 1
        if left > 0:
            self._per_peer[host] = left
        else:
            del self._per_peer[host]
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The session closed its socket; what escaped it is a bug, recorded here once.
            self._audit.problem("internal_error", error=f"{type(exc).__name__}: {exc}",
                                where="session boundary")
        session = started[0] if started else None
        if session is not None and self.on_session_end is not None:
            if task.cancelled():
                outcome = "cancelled"
            elif task.exception() is not None:
                outcome = "internal_error"
            else:
                outcome = task.result()
            self.on_session_end(session.action, outcome)
