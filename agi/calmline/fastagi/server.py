"""The FastAGI listener: accepts Asterisk's connections and hands each to a `Session`.

It enforces the limits that keep one bad client from hurting the others: an address
allowlist, a cap on concurrent sessions, a line-length cap (the stream's buffer limit)
and the timeouts the session's stream applies.
"""

from __future__ import annotations

import asyncio
import ipaddress

from calmline.fastagi.contract import Registry
from calmline.audit.trail import AuditTrail
from calmline.config import Config
from calmline.fastagi.protocol import AGIStream
from calmline.fastagi.session import Session


class FastAGIServer:
    """Serve FastAGI sessions until closed; `close()` lets running sessions finish."""

    def __init__(self, config: Config, registry: Registry, audit: AuditTrail):
        self._config = config
        self._registry = registry
        self._audit = audit
        self._allowed = config.server.allowed_networks()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sessions: set[asyncio.Task] = set()

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    async def start(self) -> tuple[str, int]:
        """Bind and listen; return the address actually bound (port 0 picks a free one)."""
        cfg = self._config.server
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            self._new_stream, cfg.host, cfg.port, backlog=1024
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        self._audit.event("server_listening", host=host, port=port, paths=self._registry.paths())
        return host, port

    def _new_stream(self) -> AGIStream:
        cfg = self._config.server
        return AGIStream(
            answer_timeout=cfg.answer_timeout, max_line=cfg.max_line_bytes,
            on_connect=self._on_connection, loop=self._loop,
        )

    async def serve_forever(self) -> None:
        assert self._server is not None, "start() first"
        await self._server.serve_forever()

    async def close(self, grace: float = 30.0) -> None:
        """Stop accepting, then wait up to `grace` seconds for running sessions."""
        if self._server is not None:
            self._server.close()
        pending = set(self._sessions)
        if pending:
            self._audit.event("server_draining", sessions=len(pending), grace_s=grace)
            _done, still = await asyncio.wait(pending, timeout=grace)
            for task in still:
                task.cancel()
        self._audit.event("server_stopped")

    def _allowed_peer(self, host: str) -> bool:
        if not self._allowed:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self._allowed)

    def _on_connection(self, stream: AGIStream) -> None:
        host = stream.peer.rpartition(":")[0]
        if not self._allowed_peer(host):
            self._audit.problem("connection_refused", peer=stream.peer, reason="address not in server.allow")
            stream.abort()
            return
        if len(self._sessions) >= self._config.server.max_sessions:
            self._audit.problem(
                "connection_refused",
                peer=stream.peer,
                reason=f"server.max_sessions ({self._config.server.max_sessions}) reached",
            )
            stream.abort()
            return
        session = Session(
            stream, registry=self._registry, config=self._config, audit=self._audit, peer=stream.peer
        )
        task = self._loop.create_task(session.run())
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)
