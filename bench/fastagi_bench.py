#!/usr/bin/env python3
"""FastAGI throughput, latency and store figures: calmline beside its peers, in one run.

This script plays Asterisk's side of FastAGI over loopback. Each server runs the same
warn session (the same 4 commands, the same answers) in its own process; one asyncio
client process drives them and answers each command at once. Three parts, each
interleaved so that drift on a shared machine hits every server alike:

  throughput  sessions/s at concurrency 1 and 50, time to first command, CPU per session:
              calmline, panoramisk with the durable audit a user would add
              (panoramisk-audit), the same peer storing what calmline stores
              (panoramisk-store), panoramisk without audit, a bare asyncio server.
  burst       sessions offered at a fixed rate (500/s for 10 s): p50/p99 from connect to
              the first STREAM FILE and of the whole session, with durable commits.
  stores      calmline on SQLite, on PostgreSQL, and two instances on one PostgreSQL
              behind a round-robin client: sessions/s, step-commit p99, commits the
              database saw (needs --pg URL).

    python bench/fastagi_bench.py [--quick] [--parts throughput,burst,stores] [--pg URL]

Nothing here fails on speed; the ratio lines say met or missed. Method and history:
bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- the session

EXPECTED = (
    b'GET FULL VARIABLE "${CHANNEL(linkedid)}]|[${BRIDGEPEER}]|[${CALMLINE_WARNINGS}"',
    b'STREAM FILE "calmline/warn-1" ""',
    b'SET VARIABLE CALMLINE_WARNINGS "1"',
    b'SET VARIABLE CALMLINE_STATUS "ok"',
)
ANSWERS = (
    b"200 result=1 (1795350788.44]|[Local/warnscn@sim-agent-00000017;1]|[)\n",
    b"200 result=0 endpos=24000\n",
    b"200 result=1\n",
    b"200 result=1\n",
)
COMMANDS = tuple(c.decode() for c in EXPECTED)
PROMPT_INDEX = 1  # the STREAM FILE
SESSION_TIMEOUT = 15.0
# What each target is: server kind, instances, store ("sqlite", "pg-1", "pg-2" or None).
TARGETS = {
    "calmline": ("calmline", 1, "sqlite"),
    "panoramisk-audit": ("panoramisk-audit", 1, None),
    "panoramisk-store": ("panoramisk-store", 1, None),
    "panoramisk": ("panoramisk", 1, None),
    "bare-asyncio": ("bare-asyncio", 1, None),
    "calmline-pg": ("calmline", 1, "pg-1"),
    "calmline-pg-x2": ("calmline", 2, "pg-2"),
    "calmline-alt": ("calmline", 1, "sqlite"),  # calmline loaded from --alt DIR (A/B runs)
}
ORDER = tuple(TARGETS)
# glibc's malloc settings for every server process (bench/README.md, 2026-11-26).
# asyncio reads a plain protocol's socket with recv(256 KiB); left to glibc's dynamic
# thresholds, whether that buffer comes from the heap (~1.4 us a read) or from mmap (~12 us)
# depends on the process's allocation history. Pinned, every server reads from the heap:
# the peers are measured at their best.
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 20)}


def environment_template() -> str:
    """Asterisk 22's environment block (tests/fake_asterisk.py), uniqueid as a %d slot."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from fake_asterisk import environment
    finally:
        sys.path.pop(0)
    block = "".join(environment("warn", uniqueid="@@UNIQUEID@@"))
    return block.replace("%", "%%").replace("@@UNIQUEID@@", "1795350788.%d")


# --------------------------------------------------------------------------- servers


def _new_loop_factory(use_uvloop: bool):
    if use_uvloop:
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


async def _bare_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while (await reader.readline()) not in (b"\n", b""):
            pass
        for command in COMMANDS:
            writer.write(command.encode() + b"\n")
            if not await reader.readline():
                break
    finally:
        writer.close()


async def _panoramisk_audit(path: str, waits: list[float]):
    """panoramisk's warn with the durable audit a user would add: the step's row inserted
    and committed through aiosqlite (WAL, synchronous=FULL), awaited, once per step."""
    import aiosqlite

    db = await aiosqlite.connect(path)
    await db.execute("PRAGMA journal_mode = WAL")
    await db.execute("PRAGMA synchronous = FULL")
    await db.execute("CREATE TABLE IF NOT EXISTS steps (id INTEGER PRIMARY KEY, ts TEXT, "
                     "uniqueid TEXT, linkedid TEXT, step TEXT, data TEXT)")
    await db.commit()
    encode = json.JSONEncoder().encode

    async def warn(request):
        headers = request.headers
        await request.send_command(COMMANDS[0])
        await request.send_command(COMMANDS[1])
        row = {"event": "step", "step": "warning_played", "warning": 1, "final": False,
               "prompt": "calmline/warn-1", "uniqueid": headers.get("agi_uniqueid"),
               "channel": headers.get("agi_channel"), "linkedid": "1795350788.44",
               "ts": time.time()}
        t = time.perf_counter()
        await db.execute("INSERT INTO steps (ts, uniqueid, linkedid, step, data) VALUES (?, ?, ?, ?, ?)",
                         (row["ts"], row["uniqueid"], row["linkedid"], row["step"], encode(row)))
        await db.commit()
        waits.append(time.perf_counter() - t)
        await request.send_command(COMMANDS[2])
        await request.send_command(COMMANDS[3])

    return db, warn


async def _panoramisk_store(path: str, waits: list[float]):
    """panoramisk's warn doing calmline's storage job: the session's three events (start, the
    step, end) as rows of calmline's own schema (its migrations: the same indexes and the
    triggers that keep `escalations`), through aiosqlite (WAL, synchronous=FULL), one
    connection; the start and the step committed together once the prompt has played (the
    step awaited, as calmline's is), the end committed before the session closes."""
    import aiosqlite

    from calmline.store import Database
    from calmline.store.schema import EVENT_COLUMNS

    Database("sqlite:///" + path).open_checked()  # creates calmline's schema
    db = await aiosqlite.connect(path)
    await db.execute("PRAGMA journal_mode = WAL")
    await db.execute("PRAGMA synchronous = FULL")
    insert = (f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))}) "
              "ON CONFLICT (event_id) DO NOTHING")
    encode = json.JSONEncoder().encode
    prefix, ids = os.urandom(6).hex(), iter(range(1, 1 << 62))

    def row(event: dict) -> tuple:
        event["event_id"] = f"{prefix}-{next(ids)}"
        event["ts"] = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        return (*[event.get(c) for c in EVENT_COLUMNS[:-1]], encode(event))

    async def warn(request):
        headers = request.headers
        started = time.perf_counter()
        call = {"session": f"{prefix}-s{next(ids)}", "action": "warn", "uniqueid": headers.get("agi_uniqueid"),
                "channel": headers.get("agi_channel"), "caller_number": headers.get("agi_callerid"),
                "caller_name": headers.get("agi_calleridname")}
        linked = (await request.send_command(COMMANDS[0]))["result"][1].split("]|[")
        call.update(linkedid=linked[0], agent=linked[1])
        await db.execute(insert, row({**call, "event": "session_start", "level": "info"}))
        await request.send_command(COMMANDS[1])
        t = time.perf_counter()
        await db.execute(insert, row({**call, "event": "step", "level": "info", "step": "warning_played",
                                      "warning": 1, "final": False, "repeated": False,
                                      "prompt": "calmline/warn-1"}))
        await db.commit()
        waits.append(time.perf_counter() - t)
        await request.send_command(COMMANDS[2])
        await db.execute(insert, row({**call, "event": "session_end", "level": "info", "outcome": "completed",
                                      "status": "ok", "duration_ms": round((time.perf_counter() - started) * 1000, 3)}))
        await db.commit()
        await request.send_command(COMMANDS[3])

    return db, warn


def _measure_steps(waits: list[float]) -> None:
    """Record how long each of calmline's steps waits for its commit (bench-only wrapper)."""
    from calmline.audit.trail import AuditTrail

    original = AuditTrail.step

    async def step(self, name, **fields):
        t = time.perf_counter()
        try:
            return await original(self, name, **fields)
        finally:
            waits.append(time.perf_counter() - t)

    AuditTrail.step = step


async def _start(kind: str, tmpdir: str, store_url: str | None, state: dict,
                 peers_gc: bool) -> tuple[str, int]:
    if kind == "calmline":
        from calmline import service as service_module
        from calmline.config import Config

        _measure_steps(state["step_waits"])
        config = Config.model_validate({
            "server": {"host": "127.0.0.1", "port": 0},
            "store": {"url": store_url},
            "audit": {"stdout": True},
        })
        state["devnull"] = open(os.devnull, "w", encoding="utf-8")
        svc = service_module.build(config, stdout=state["devnull"])
        state["service"] = svc
        address = await svc.start()
        service_module.tune_gc()  # as `calmline serve` does
        return address
    if kind in ("panoramisk", "panoramisk-audit", "panoramisk-store"):
        from panoramisk.fast_agi import Application

        if kind == "panoramisk-audit":
            state["aiosqlite"], warn = await _panoramisk_audit(
                os.path.join(tmpdir, "steps.sqlite3"), state["step_waits"])
        elif kind == "panoramisk-store":
            state["aiosqlite"], warn = await _panoramisk_store(
                os.path.join(tmpdir, "store.sqlite3"), state["step_waits"])
        else:
            async def warn(request):
                for command in COMMANDS:
                    await request.send_command(command)

        app = Application()
        app.add_route("warn", warn)
        server = await asyncio.start_server(app.handler, "127.0.0.1", 0, backlog=1024)
    elif kind == "bare-asyncio":
        server = await asyncio.start_server(_bare_handler, "127.0.0.1", 0, backlog=1024)
    else:
        raise ValueError(kind)
    state["server"] = server
    if peers_gc:
        from calmline.service import tune_gc

        tune_gc()
    return server.sockets[0].getsockname()[:2]


def _stat_cpu(path: str) -> float | None:
    """User + system CPU seconds from a /proc `stat` file (10 ms ticks); None if it is gone."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu() -> dict[str, float]:
    """CPU seconds per thread of this process (Linux /proc; 10 ms ticks): loop, other."""
    main_id = threading.main_thread().native_id
    out: dict[str, float] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        cpu = _stat_cpu(f"/proc/self/task/{tid}/stat")
        if cpu is not None:
            name = "loop" if int(tid) == main_id else "other"
            out[name] = out.get(name, 0.0) + cpu
    return out


def _snapshot(kind: str, state: dict) -> dict:
    """CPU so far, the step waits since the last snapshot, and (calmline) the commits once
    everything queued is committed."""
    if kind == "calmline":
        state["service"].store.flush(30.0)
    waits, state["step_waits"][:] = list(state["step_waits"]), []
    snap = {"cpu": time.process_time(), "threads": _thread_cpu(), "step_waits": waits}
    if kind == "calmline":
        snap["commits"] = state["service"].store.commits
    return snap


async def _serve(kind: str, conn, tmpdir: str, store_url: str | None, peers_gc: bool) -> None:
    import cProfile
    import io
    import pstats

    state: dict = {"step_waits": []}
    loop = asyncio.get_running_loop()
    profiler: cProfile.Profile | None = None
    try:
        host, port = await _start(kind, tmpdir, store_url, state, peers_gc)
        conn.send({"port": port, "loop": type(loop).__module__ + "." + type(loop).__name__,
                   "malloc": {k: os.environ.get(k) for k in PINNED_MALLOC}})
        while True:
            message = await loop.run_in_executor(None, conn.recv)
            op = message[0]
            if op == "snapshot":
                conn.send(await asyncio.to_thread(_snapshot, kind, state))
            elif op == "profile_start":
                profiler = cProfile.Profile()
                profiler.enable()
                conn.send(True)
            elif op == "profile_stop":
                assert profiler is not None
                profiler.disable()
                out = io.StringIO()
                stats = pstats.Stats(profiler, stream=out)
                stats.sort_stats("tottime").print_stats(message[1])
                profiler = None
                conn.send(out.getvalue())
            elif op == "stop":
                final: dict = {}
                if kind == "calmline":
                    svc = state["service"]
                    await svc.stop(grace=5.0)
                    final["commits"] = svc.store.commits
                else:
                    state["server"].close()
                    if "aiosqlite" in state:
                        await state["aiosqlite"].close()
                conn.send(final)
                return
    finally:
        if "devnull" in state and not state["devnull"].closed:
            state["devnull"].close()


def server_process(kind: str, conn, use_uvloop: bool, tmpdir: str, store_url: str | None,
                   peers_gc: bool, code: str | None = None) -> None:
    if code:
        sys.path.insert(0, code)  # before anything imports calmline
    with asyncio.Runner(loop_factory=_new_loop_factory(use_uvloop)) as runner:
        runner.run(_serve(kind, conn, tmpdir, store_url, peers_gc))


class ServerHandle:
    """One server process, spoken to over a pipe."""

    def __init__(self, kind: str, use_uvloop: bool, store_url: str | None, tmpdir: str,
                 peers_gc: bool = False, code: str | None = None):
        ctx = mp.get_context("spawn")
        self.kind = kind
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=server_process,
                                   args=(kind, child, use_uvloop, tmpdir, store_url, peers_gc, code),
                                   name=f"bench-{kind}", daemon=True)
        self.process.start()
        if not self.conn.poll(60):
            self.close()
            raise RuntimeError(f"{kind} server did not start")
        info = self.conn.recv()
        self.port: int = info["port"]
        self.loop: str = info["loop"]
        self.malloc: dict[str, str | None] = info["malloc"]  # as the server process saw it

    def ask(self, *message):
        self.conn.send(message)
        return self.conn.recv()

    def stop(self) -> dict:
        try:
            final = self.ask("stop")
            self.process.join(30)
        finally:
            self.close()
        return final

    def close(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


class Target:
    """What the client drives: one or more server processes sharing one store."""

    def __init__(self, name: str, args, pg: PgAdmin | None):
        self.name = name
        kind, instances, store = TARGETS[name]
        self.kind = kind
        # The parent owns the temp directory, so it is removed even if a child dies.
        self.tmpdir = tempfile.mkdtemp(prefix=f"fastagi-bench-{name}-")
        self.store_url: str | None = None
        self.pg_db: str | None = None
        if store == "sqlite":
            self.store_url = "sqlite:///" + os.path.join(self.tmpdir, "calmline.sqlite3")
        elif store is not None:
            assert pg is not None
            self.pg_db = f"calmline_bench_{store.replace('-', '_')}_{os.urandom(3).hex()}"
            self.store_url = pg.fresh_database(self.pg_db)
        self.warm_sessions = 0
        self.counted = {"events": 0, "steps": 0}  # the store's counts after the last run
        self.count_queries = 0  # transactions the benchmark ran on the store to count
        self.handles: list[ServerHandle] = []
        try:
            for _ in range(instances):
                code = str(Path(args.alt).resolve()) if name == "calmline-alt" else None
                self.handles.append(ServerHandle(kind, args.uvloop, self.store_url, self.tmpdir,
                                                 args.peers_gc, code))
        except BaseException:
            self.close()
            raise

    @property
    def ports(self) -> list[int]:
        return [h.port for h in self.handles]

    def snapshot(self) -> list[dict]:
        for h in self.handles:
            h.conn.send(("snapshot",))
        return [h.conn.recv() for h in self.handles]

    def count_events(self) -> dict | None:
        """Events and step events in the target's store (calmline only)."""
        if self.kind != "calmline":
            return None
        from calmline.store import Database

        conn = Database(self.store_url).connect()
        try:
            events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            steps = conn.execute("SELECT count(*) FROM events WHERE event = 'step'").fetchone()[0]
        finally:
            conn.close()
        self.count_queries += 2
        return {"events": events, "steps": steps}

    def memory(self) -> dict:
        """Processes (each server and its descendants), threads and RSS, from /proc."""
        procs = threads = rss = hwm = 0
        for h in self.handles:
            for pid in [h.process.pid, *_descendants(h.process.pid)]:
                status = _proc_status(pid)
                if not status:
                    continue
                procs += 1
                threads += int(status.get("Threads", "0"))
                rss += int(status.get("VmRSS", "0 kB").split()[0])
                hwm += int(status.get("VmHWM", "0 kB").split()[0])
        return {"processes": procs, "threads": threads, "rss_kib": rss, "peak_rss_kib": hwm}

    def stop(self) -> list[dict]:
        """Stop the servers; the store stays until `close()`."""
        try:
            return [h.stop() for h in self.handles]
        finally:
            for h in self.handles:
                h.close()

    def close(self) -> None:
        for h in self.handles:
            h.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _proc_status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


class PgAdmin:
    """The benchmark's own connection to PostgreSQL: fresh databases, commit counters."""

    def __init__(self, url: str):
        import psycopg

        self._psycopg = psycopg
        self.url = url
        self.created: list[str] = []
        self.conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        self.version = self.conn.execute("SHOW server_version").fetchone()[0]
        self.settings = {name: self.conn.execute(f"SHOW {name}").fetchone()[0]
                         for name in ("fsync", "synchronous_commit", "commit_delay")}

    def fresh_database(self, name: str) -> str:
        from urllib.parse import urlsplit, urlunsplit

        self.conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path="/" + name))

    def xid(self) -> int:
        """The next transaction id: its delta over a run counts the write transactions the
        cluster committed or aborted in that run, at once (pg_stat_database's counters reach
        the view only up to 10 s after a busy backend goes idle; they are read at the end)."""
        return int(self.conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()[0])

    def cluster_cpu(self) -> float:
        """CPU seconds used so far by the cluster's processes still alive (postmaster and its
        children: backends, WAL writer, checkpointer), from /proc; 0 if they are not local."""
        pid = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        try:
            with open(f"/proc/{pid}/stat") as f:
                postmaster = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return 0.0
        return sum(_stat_cpu(f"/proc/{p}/stat") or 0.0 for p in [postmaster, *_descendants(postmaster)])

    def xact_commit(self, name: str) -> int:
        row = self.conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s",
                                (name,)).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        """Drop the databases this run created, then disconnect."""
        for name in self.created:
            try:
                self.conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except self._psycopg.Error as exc:
                print(f"could not drop database {name}: {exc}", file=sys.stderr)
        self.conn.close()


# --------------------------------------------------------------------------- client


_CHUNK = memoryview(bytearray(4096))  # every client reads into this, one read at a time


class AGIClient(asyncio.BufferedProtocol):
    """Asterisk's side of one session: send the env, answer each expected command at once.

    Buffered, as Asterisk reads into a fixed buffer: a plain protocol's reads are
    `recv(256 KiB)`, which glibc may serve with mmap + munmap at ~11 us each depending on
    this process's heap, a cost that would then come and go with the client, not the server.
    """

    __slots__ = ("env", "done", "transport", "buf", "index", "t_env", "t_first", "t_prompt", "error")

    def __init__(self, env: bytes, done: asyncio.Future):
        self.env = env
        self.done = done
        self.buf = b""
        self.index = 0
        self.t_env = self.t_first = self.t_prompt = 0.0
        self.error: str | None = None

    def get_buffer(self, sizehint):
        return _CHUNK

    def buffer_updated(self, nbytes):
        self.data_received(bytes(_CHUNK[:nbytes]))

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.env)
        self.t_env = time.perf_counter()

    def data_received(self, data: bytes):
        buf = self.buf + data
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl], buf[nl + 1:]
            i = self.index
            if i == 0:
                self.t_first = time.perf_counter()
            elif i == PROMPT_INDEX:
                self.t_prompt = time.perf_counter()
            if i >= len(EXPECTED) or line != EXPECTED[i]:
                self.error = f"command {i + 1}: got {line[:80]!r}"
                self.transport.close()
                return
            self.transport.write(ANSWERS[i])
            self.index = i + 1
        self.buf = buf

    def eof_received(self):
        return False  # close our side too

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(exc)


class Timings:
    def __init__(self):
        self.first: list[float] = []   # env written -> first command
        self.prompt: list[float] = []  # connect -> STREAM FILE
        self.whole: list[float] = []   # connect -> server's close
        self.errors: list[str] = []


async def _one(loop, timings: Timings, port: int, env: bytes) -> None:
    done = loop.create_future()
    t0 = time.perf_counter()
    try:
        transport, proto = await loop.create_connection(lambda: AGIClient(env, done), "127.0.0.1", port)
    except OSError as exc:
        timings.errors.append(f"connect: {exc}")
        return
    try:
        async with asyncio.timeout(SESSION_TIMEOUT):
            exc = await done
    except TimeoutError:
        transport.abort()
        timings.errors.append(f"timeout after {proto.index} commands")
        return
    t1 = time.perf_counter()
    if proto.error:
        timings.errors.append(proto.error)
    elif exc is not None:
        timings.errors.append(f"connection lost after {proto.index} commands: {exc}")
    elif proto.index != len(EXPECTED) or proto.buf:
        timings.errors.append(f"server closed after {proto.index} commands (trailing {proto.buf[:40]!r})")
    else:
        timings.first.append(proto.t_first - proto.t_env)
        timings.prompt.append(proto.t_prompt - t0)
        timings.whole.append(t1 - t0)


async def drive(ports: list[int], sessions: int, concurrency: int, template: str) -> dict:
    """Closed loop: `sessions` sessions, `concurrency` at a time, round-robin over `ports`."""
    loop = asyncio.get_running_loop()
    timings = Timings()
    counter = iter(range(sessions))

    async def worker() -> None:
        for n in counter:
            await _one(loop, timings, ports[n % len(ports)], (template % n).encode())

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"t": timings, "wall": time.perf_counter() - t0, "cpu": time.process_time() - cpu0}


async def offer(ports: list[int], rate: float, seconds: float, template: str) -> dict:
    """Open loop: start a session every 1/rate s for `seconds`, whatever is still running."""
    loop = asyncio.get_running_loop()
    timings = Timings()
    n_total = int(rate * seconds)
    lag: list[float] = []
    tasks = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    start = loop.time() + 0.01
    for n in range(n_total):
        due = start + n / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lag.append(loop.time() - due)
        tasks.append(loop.create_task(_one(loop, timings, ports[n % len(ports)], (template % n).encode())))
    await asyncio.gather(*tasks)
    return {"t": timings, "wall": time.perf_counter() - t0, "cpu": time.process_time() - cpu0,
            "lag": sorted(lag), "sessions": n_total}


@dataclass
class RunResult:
    server: str
    concurrency: int
    sessions: int
    wall_s: float
    sessions_per_s: float
    first_cmd_p50_ms: float
    first_cmd_p99_ms: float
    prompt_p50_ms: float
    prompt_p99_ms: float
    session_p50_ms: float
    session_p99_ms: float
    errors: int
    server_cpu_us_per_session: float
    client_cpu_pct: float
    server_cpu_pct: float
    server_threads_us_per_session: dict[str, float] = field(default_factory=dict)
    step_commit_p50_ms: float | None = None
    step_commit_p99_ms: float | None = None
    audit_events: int | None = None
    audit_steps: int | None = None
    service_commits: int | None = None
    db_commits: int | None = None
    db_commits_per_s: float | None = None
    db_cpu_us_per_session: float | None = None
    offered_per_s: float | None = None
    start_lag_p99_ms: float | None = None
    repeats: int = 1
    sessions_per_s_runs: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


def measure(target: Target, client: asyncio.Runner, template: str, *, sessions: int = 0,
            concurrency: int = 0, rate: float = 0.0, seconds: float = 0.0,
            pg: PgAdmin | None = None, count: bool = True) -> RunResult:
    """One run against `target`: closed loop (sessions, concurrency) or open (rate, seconds)."""
    if target.pg_db and pg is not None:
        xid0, db_cpu0 = pg.xid(), pg.cluster_cpu()
    before = target.snapshot()
    if rate:
        raw = client.run(offer(target.ports, rate, seconds, template))
        sessions = raw["sessions"]
    else:
        raw = client.run(drive(target.ports, sessions, concurrency, template))
    after = target.snapshot()
    t: Timings = raw["t"]
    server_cpu = sum(a["cpu"] - b["cpu"] for a, b in zip(after, before))
    threads: dict[str, float] = {}
    for a, b in zip(after, before):
        for name, cpu in a["threads"].items():
            threads[name] = threads.get(name, 0.0) + cpu - b["threads"].get(name, 0.0)
    waits = [w for a in after for w in a["step_waits"]]
    result = RunResult(
        server=target.name,
        concurrency=concurrency,
        sessions=sessions,
        wall_s=raw["wall"],
        sessions_per_s=sessions / raw["wall"],
        sessions_per_s_runs=[sessions / raw["wall"]],
        first_cmd_p50_ms=_pct(t.first, 0.50) * 1e3,
        first_cmd_p99_ms=_pct(t.first, 0.99) * 1e3,
        prompt_p50_ms=_pct(t.prompt, 0.50) * 1e3,
        prompt_p99_ms=_pct(t.prompt, 0.99) * 1e3,
        session_p50_ms=_pct(t.whole, 0.50) * 1e3,
        session_p99_ms=_pct(t.whole, 0.99) * 1e3,
        errors=len(t.errors),
        server_cpu_us_per_session=server_cpu / sessions * 1e6,
        client_cpu_pct=raw["cpu"] / raw["wall"] * 100,
        server_cpu_pct=server_cpu / raw["wall"] * 100,
        error_samples=t.errors[:5],
        server_threads_us_per_session={k: round(v / sessions * 1e6) for k, v in threads.items()},
    )
    if waits:
        result.step_commit_p50_ms = _pct(waits, 0.50) * 1e3
        result.step_commit_p99_ms = _pct(waits, 0.99) * 1e3
    if rate:
        result.offered_per_s = rate
        result.start_lag_p99_ms = _pct(raw["lag"], 0.99) * 1e3
    if "commits" in after[0]:
        result.service_commits = sum(a["commits"] - b["commits"] for a, b in zip(after, before))
    if target.pg_db and pg is not None:
        result.db_commits = pg.xid() - xid0
        result.db_cpu_us_per_session = (pg.cluster_cpu() - db_cpu0) / sessions * 1e6
        result.db_commits_per_s = result.db_commits / raw["wall"]
    elif result.service_commits is not None:
        result.db_commits = result.service_commits  # SQLite: the service is its only writer
        result.db_commits_per_s = result.db_commits / raw["wall"]
    if count and target.kind == "calmline":  # after the commit counter: these are transactions too
        counts = target.count_events()
        if counts is not None:
            result.audit_events = counts["events"] - target.counted["events"]
            result.audit_steps = counts["steps"] - target.counted["steps"]
            target.counted = counts
    return result


def combine(runs: list[RunResult]) -> RunResult:
    """Repeats of one row: medians of the per-run figures, sums of counts."""
    med = statistics.median
    first = runs[0]
    threads = {name for r in runs for name in r.server_threads_us_per_session}

    def med_opt(name: str):
        values = [getattr(r, name) for r in runs if getattr(r, name) is not None]
        return med(values) if values else None

    def sum_opt(name: str):
        values = [getattr(r, name) for r in runs if getattr(r, name) is not None]
        return sum(values) if values else None

    out = RunResult(
        server=first.server,
        concurrency=first.concurrency,
        sessions=sum(r.sessions for r in runs),
        wall_s=sum(r.wall_s for r in runs),
        sessions_per_s=med(r.sessions_per_s for r in runs),
        errors=sum(r.errors for r in runs),
        repeats=len(runs),
        sessions_per_s_runs=[round(r.sessions_per_s) for r in runs],
        error_samples=[e for r in runs for e in r.error_samples][:5],
        server_threads_us_per_session={
            name: med(r.server_threads_us_per_session.get(name, 0) for r in runs) for name in threads
        },
        **{name: med(getattr(r, name) for r in runs) for name in (
            "first_cmd_p50_ms", "first_cmd_p99_ms", "prompt_p50_ms", "prompt_p99_ms",
            "session_p50_ms", "session_p99_ms", "server_cpu_us_per_session", "client_cpu_pct",
            "server_cpu_pct")},
    )
    for name in ("step_commit_p50_ms", "step_commit_p99_ms", "db_commits_per_s",
                 "db_cpu_us_per_session", "offered_per_s",
                 "start_lag_p99_ms"):
        setattr(out, name, med_opt(name))
    for name in ("audit_events", "audit_steps", "service_commits", "db_commits"):
        setattr(out, name, sum_opt(name))
    return out


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _busy_elsewhere(seconds: float = 1.0) -> str:
    """How much of the machine's CPU was in use just before the run (all processes)."""
    def read() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    try:
        a = read()
        time.sleep(seconds)
        b = read()
    except OSError:
        return "?"
    delta = [y - x for x, y in zip(a, b)]
    idle = delta[3] + delta[4]
    total = sum(delta[:8]) or 1
    return f"{(total - idle) / total * 100:.0f}% of {os.cpu_count()} CPUs busy"


# --------------------------------------------------------------------------- report


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_throughput(results: list[RunResult]) -> None:
    header = (f"{'server':<17}{'conc':>5}{'sessions':>9}{'sessions/s':>11}{'(min-max)':>12}"
              f"{'first-cmd p50':>14}{'p99':>7}{'session p50':>12}{'p99':>7}"
              f"{'step commit p50':>16}{'p99':>7}{'srv us/sess':>12}{'srv%':>6}{'cli%':>6}{'err':>5}")
    print(header)
    print("-" * len(header))
    last = None
    for r in sorted(results, key=lambda r: (r.concurrency, ORDER.index(r.server))):
        if last is not None and r.concurrency != last:
            print()
        last = r.concurrency
        spread = f"{min(r.sessions_per_s_runs):.0f}-{max(r.sessions_per_s_runs):.0f}"
        print(f"{r.server:<17}{r.concurrency:>5}{r.sessions:>9}{r.sessions_per_s:>11.0f}{spread:>12}"
              f"{r.first_cmd_p50_ms:>14.3f}{r.first_cmd_p99_ms:>7.2f}"
              f"{r.session_p50_ms:>12.3f}{r.session_p99_ms:>7.2f}"
              f"{_fmt(r.step_commit_p50_ms, '.3f'):>16}{_fmt(r.step_commit_p99_ms, '.2f'):>7}"
              f"{r.server_cpu_us_per_session:>12.0f}{r.server_cpu_pct:>6.0f}"
              f"{r.client_cpu_pct:>6.0f}{r.errors:>5}")
        for sample in r.error_samples:
            print(f"    error: {sample}")
    print("(times in ms; first-cmd: environment written -> first command; session: connect -> "
          "close; step commit: how long the step waited for its commit)")


def print_threads(results: list[RunResult]) -> None:
    print("\nserver CPU by thread, us/session (/proc, 10 ms ticks; loop = event-loop thread; other = "
          "calmline's writer, aiosqlite's thread, the benchmark's pipe thread):")
    for r in sorted(results, key=lambda r: (ORDER.index(r.server), r.concurrency)):
        parts = ", ".join(f"{name} {us:.0f}" for name, us in sorted(r.server_threads_us_per_session.items()))
        print(f"  {r.server:<17} conc {r.concurrency:>3}: {parts}")


def print_audit(results: list[RunResult]) -> None:
    print("\naudit trail, totals over the measured runs (events written, step events, commits):")
    for r in sorted(results, key=lambda r: (ORDER.index(r.server), r.concurrency)):
        if r.audit_events is None:
            continue
        done = r.sessions - r.errors
        ok = "ok" if r.audit_steps == done else "MISMATCH"
        commits = r.service_commits or 0
        print(f"  {r.server:<17} conc {r.concurrency:>3}: {r.audit_events} events, {r.audit_steps} "
              f"step events for {done} sessions ({ok}), {commits} commits "
              f"({r.audit_events / commits if commits else float('nan'):.1f} events/commit, "
              f"{done / commits if commits else float('nan'):.2f} sessions/commit)")


def print_burst(results: list[RunResult]) -> None:
    header = (f"{'server':<17}{'offered/s':>10}{'sessions':>9}{'served/s':>9}"
              f"{'to prompt p50':>14}{'p99':>7}{'session p50':>12}{'p99':>7}"
              f"{'step commit p50':>16}{'p99':>7}{'srv%':>6}{'cli%':>6}{'start lag p99':>14}{'err':>5}")
    print(header)
    print("-" * len(header))
    for r in sorted(results, key=lambda r: ORDER.index(r.server)):
        print(f"{r.server:<17}{r.offered_per_s:>10.0f}{r.sessions:>9}{r.sessions_per_s:>9.0f}"
              f"{r.prompt_p50_ms:>14.3f}{r.prompt_p99_ms:>7.2f}{r.session_p50_ms:>12.3f}"
              f"{r.session_p99_ms:>7.2f}{_fmt(r.step_commit_p50_ms, '.3f'):>16}"
              f"{_fmt(r.step_commit_p99_ms, '.2f'):>7}{r.server_cpu_pct:>6.0f}{r.client_cpu_pct:>6.0f}"
              f"{r.start_lag_p99_ms:>14.2f}{r.errors:>5}")
        for sample in r.error_samples:
            print(f"    error: {sample}")
    print("(times in ms; to prompt: connect -> STREAM FILE received; start lag: how late the client "
          "opened sessions against the schedule)")


def print_stores(results: list[RunResult]) -> None:
    header = (f"{'server':<17}{'inst':>5}{'conc':>5}{'sessions':>9}{'sessions/s':>11}{'(min-max)':>12}"
              f"{'step commit p50':>16}{'p99':>7}{'session p99':>12}{'db commits/s':>13}"
              f"{'sessions/commit':>16}{'srv us/sess':>12}{'db us/sess':>11}{'srv%':>6}{'cli%':>6}{'err':>5}")
    print(header)
    print("-" * len(header))
    for r in sorted(results, key=lambda r: ORDER.index(r.server)):
        spread = f"{min(r.sessions_per_s_runs):.0f}-{max(r.sessions_per_s_runs):.0f}"
        per = (r.sessions - r.errors) / r.db_commits if r.db_commits else None
        print(f"{r.server:<17}{TARGETS[r.server][1]:>5}{r.concurrency:>5}{r.sessions:>9}"
              f"{r.sessions_per_s:>11.0f}{spread:>12}{_fmt(r.step_commit_p50_ms, '.3f'):>16}"
              f"{_fmt(r.step_commit_p99_ms, '.2f'):>7}{r.session_p99_ms:>12.2f}"
              f"{_fmt(r.db_commits_per_s, '.0f'):>13}{_fmt(per, '.2f'):>16}"
              f"{r.server_cpu_us_per_session:>12.0f}{_fmt(r.db_cpu_us_per_session, '.0f'):>11}{r.server_cpu_pct:>6.0f}"
              f"{r.client_cpu_pct:>6.0f}{r.errors:>5}")
        for sample in r.error_samples:
            print(f"    error: {sample}")
    print("(db commits/s: SQLite, the service's commits; PostgreSQL, the write transactions the "
          "cluster saw (transaction id delta; pg_stat_database's xact_commit below, for the whole run);\n"
          " srv us/sess: every instance's CPU; db us/sess: the PostgreSQL cluster's processes' CPU)")


def ratios(throughput: list[RunResult], burst: list[RunResult], stores: list[RunResult]) -> list[dict]:
    out = []

    def add(name, value, target, met):
        out.append({"name": name, "value": value, "target": target, "met": met})

    by = {(r.server, r.concurrency): r for r in throughput}
    a = by.get(("calmline", 50))
    for peer, target in (("panoramisk-store", ">= 1.0"), ("panoramisk-audit", ">= 1.0"), ("panoramisk", None)):
        b = by.get((peer, 50))
        if a and b:
            value = a.sessions_per_s / b.sessions_per_s
            add(f"calmline/{peer} sessions/s @50", value, target, value >= 1.0 if target else None)
    a, b = by.get(("calmline", 1)), by.get(("bare-asyncio", 1))
    if a and b:
        value = a.first_cmd_p50_ms / b.first_cmd_p50_ms
        add("calmline/bare first-cmd p50 @1", value, "<= 1.3", value <= 1.3)
    for r in burst:
        if r.server == "calmline":
            add(f"calmline connect->first STREAM FILE p99 at {r.offered_per_s:.0f}/s offered (ms)",
                r.prompt_p99_ms, "<= 5", r.prompt_p99_ms <= 5.0)
    s = {r.server: r for r in stores}
    if "calmline" in s and "calmline-pg" in s:
        value = s["calmline-pg"].sessions_per_s / s["calmline"].sessions_per_s
        add("one instance on PostgreSQL / on SQLite, sessions/s", value, ">= 0.8", value >= 0.8)
    if "calmline-pg" in s and "calmline-pg-x2" in s:
        value = s["calmline-pg-x2"].sessions_per_s / s["calmline-pg"].sessions_per_s
        add("two instances / one on PostgreSQL, sessions/s", value, "> 1.0", value > 1.0)
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="throughput,burst,stores",
                        help="comma-separated parts to run (default: all three; stores only with --pg)")
    parser.add_argument("--servers", default="calmline,panoramisk-store,panoramisk-audit,panoramisk,bare-asyncio",
                        help="throughput part: comma-separated servers")
    parser.add_argument("--sessions", type=int, default=None,
                        help="throughput and stores parts: sessions per measured run (default: "
                             "1000 at concurrency 1, 3000 at higher concurrency; a tenth with --quick)")
    parser.add_argument("--concurrency", default="1,50",
                        help="throughput part: comma-separated concurrency levels (default 1,50)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="measured runs per row, interleaved; tables show medians (default 5)")
    parser.add_argument("--burst-servers", default="calmline,panoramisk-store,panoramisk-audit",
                        help="burst part: comma-separated servers")
    parser.add_argument("--burst-rate", type=float, default=500.0, help="sessions offered per second")
    parser.add_argument("--burst-seconds", type=float, default=10.0)
    parser.add_argument("--burst-repeat", type=int, default=3, help="burst runs per server (default 3)")
    parser.add_argument("--pg", metavar="URL",
                        help="stores part: a PostgreSQL URL whose user may create databases "
                             "(two fresh ones, calmline_bench_pg_*, dropped at the end)")
    parser.add_argument("--stores-concurrency", type=int, default=50)
    parser.add_argument("--quick", action="store_true",
                        help="a tenth of the sessions, 2 s bursts, 3 repeats")
    parser.add_argument("--uvloop", action="store_true",
                        help="run the servers (and the client) on uvloop")
    parser.add_argument("--peers-gc", action="store_true",
                        help="give the peers calmline's garbage collector settings too")
    parser.add_argument("--malloc-as-is", action="store_true",
                        help="leave glibc's malloc thresholds dynamic in the server processes")
    parser.add_argument("--alt", metavar="DIR",
                        help="also measure calmline-alt: calmline imported from DIR (a copy of "
                             "agi/ with a change), interleaved with the rest, for A/B comparisons")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--profile", action="store_true",
                        help="after measuring, one cProfile'd calmline run at the highest "
                             "concurrency (loop thread only); prints the top functions")
    parser.add_argument("--profile-top", type=int, default=25)
    args = parser.parse_args(argv)

    parts = [p for p in args.parts.split(",") if p]
    for p in parts:
        if p not in ("throughput", "burst", "stores"):
            parser.error(f"unknown part {p!r}")
    if "stores" in parts and not args.pg:
        print("stores part skipped: give --pg URL (bench/README.md says how to start a throwaway "
              "PostgreSQL)", file=sys.stderr)
        parts.remove("stores")
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    servers = [s for s in args.servers.split(",") if s] if "throughput" in parts else []
    burst_servers = [s for s in args.burst_servers.split(",") if s] if "burst" in parts else []
    store_targets = ["calmline", "calmline-pg", "calmline-pg-x2"] if "stores" in parts else []
    if args.alt:
        if not (Path(args.alt) / "calmline" / "__init__.py").exists():
            parser.error(f"--alt {args.alt}: no calmline package there")
        servers += ["calmline-alt"] if servers and "calmline-alt" not in servers else []
        burst_servers += ["calmline-alt"] if burst_servers and "calmline-alt" not in burst_servers else []
    for s in servers + burst_servers:
        if s not in TARGETS or TARGETS[s][2] not in (None, "sqlite"):
            parser.error(f"unknown server {s!r}")
    if args.quick:
        args.repeat = min(args.repeat, 3)
        args.burst_seconds = min(args.burst_seconds, 2.0)
        args.burst_repeat = min(args.burst_repeat, 1)
    scale = 10 if args.quick else 1

    def count(conc: int) -> int:
        if args.sessions:
            return max(1, args.sessions // scale)
        return (1000 if conc == 1 else 3000) // scale

    if args.uvloop:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            parser.error("--uvloop: uvloop is not installed")
    import calmline  # noqa: F401  (fail early if missing)
    if any(s.startswith("panoramisk") for s in servers + burst_servers):
        import panoramisk  # noqa: F401
    if {"panoramisk-audit", "panoramisk-store"} & set(servers + burst_servers):
        import aiosqlite  # noqa: F401

    template = environment_template()
    started = time.time()
    load_before = _loadavg()
    busy_before = _busy_elsewhere()
    if not args.malloc_as_is:
        os.environ.update(PINNED_MALLOC)  # read by each server process's malloc at its start
    pg = PgAdmin(args.pg) if store_targets else None
    targets: dict[str, Target] = {}
    try:
        for name in ORDER:
            if name in servers or name in burst_servers or name in store_targets:
                targets[name] = Target(name, args, pg)
        return _run(args, targets, servers, burst_servers, store_targets, levels, count, scale,
                    template, started, load_before, busy_before, pg)
    finally:
        for target in targets.values():
            target.close()  # the servers first: a database in use cannot be dropped
        if pg is not None:
            pg.close()


def _run(args, targets, servers, burst_servers, store_targets, levels, count, scale, template,
         started, load_before, busy_before, pg) -> int:
    import calmline

    throughput: dict[tuple[str, int], list[RunResult]] = {}
    bursts: dict[str, list[RunResult]] = {}
    stores: dict[str, list[RunResult]] = {}
    warmup: dict[str, int] = {}
    memory: dict[str, dict] = {}
    finals: dict[str, dict] = {}
    profile = ""

    def log(part: str, rep: int, r: RunResult) -> None:
        print(f"  {part} run {rep + 1}: {r.server:<17} conc {r.concurrency:>3}: {r.sessions_per_s:8.0f} "
              f"sessions/s, first-cmd p50 {r.first_cmd_p50_ms:.3f} ms, prompt p99 "
              f"{r.prompt_p99_ms:.2f} ms, errors {r.errors}", file=sys.stderr, flush=True)

    with asyncio.Runner(loop_factory=_new_loop_factory(args.uvloop)) as client:
        client_loop = client.get_loop()
        for name, target in targets.items():
            target.counted = target.count_events() or {"events": 0, "steps": 0}
            # Warm-up: imports, code paths, store pages, the socket layer; not reported.
            warm = [measure(target, client, template, sessions=max(50, 600 // scale),
                            concurrency=50, count=False),
                    measure(target, client, template, sessions=max(20, 100 // scale),
                            concurrency=1, count=False)]
            warmup[name] = sum(w.errors for w in warm)
            target.warm_sessions = sum(w.sessions - w.errors for w in warm)
            target.counted = target.count_events() or {"events": 0, "steps": 0}
        for rep in range(max(1, args.repeat)):
            for conc in levels:
                for name in servers:
                    r = measure(targets[name], client, template, sessions=count(conc), concurrency=conc)
                    throughput.setdefault((name, conc), []).append(r)
                    log("throughput", rep, r)
            for name in store_targets:
                r = measure(targets[name], client, template, sessions=count(args.stores_concurrency),
                            concurrency=args.stores_concurrency, pg=pg)
                stores.setdefault(name, []).append(r)
                log("stores", rep, r)
        for rep in range(max(1, args.burst_repeat)):
            for name in burst_servers:
                r = measure(targets[name], client, template, rate=args.burst_rate,
                            seconds=args.burst_seconds)
                bursts.setdefault(name, []).append(r)
                log("burst", rep, r)
        for name, target in targets.items():
            memory[name] = target.memory()
        if args.profile and "calmline" in targets:
            target = targets["calmline"]
            handle = target.handles[0]
            handle.ask("profile_start")
            measure(target, client, template, sessions=count(max(levels)), concurrency=max(levels))
            profile = handle.ask("profile_stop", args.profile_top)
        for name, target in targets.items():
            stopped = target.stop()
            if target.kind == "calmline":
                counts = target.count_events()
                served = target.warm_sessions + sum(
                    r.sessions - r.errors
                    for rows in (*throughput.values(), *bursts.values(), *stores.values())
                    for r in rows if r.server == name)
                if args.profile and name == "calmline":
                    served += count(max(levels))  # the profiled run, if error-free
                finals[name] = {**counts, "expected_steps": served,
                                "commits": sum(s.get("commits", 0) for s in stopped)}
                if target.pg_db and pg is not None:
                    time.sleep(0.5)  # the service's backends have exited and reported
                    finals[name]["xact_commit"] = pg.xact_commit(target.pg_db)
                    finals[name]["count_queries"] = target.count_queries
    elapsed = time.time() - started

    t_results = [combine(rs) for rs in throughput.values()]
    b_results = [combine(rs) for rs in bursts.values()]
    s_results = [combine(rs) for rs in stores.values()]
    loop_name = f"{type(client_loop).__module__}.{type(client_loop).__name__}"
    server_loops = {name: t.handles[0].loop for name, t in targets.items()}
    print()
    print(f"FastAGI warn session x 4 commands, loopback, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"python {platform.python_version()} ({platform.python_implementation()}), "
          f"{platform.system()} {platform.release()}, CPUs: {os.cpu_count()}")
    print(f"event loop: {'uvloop' if args.uvloop else 'asyncio default'} (client: {loop_name})")
    print(f"calmline {getattr(calmline, '__version__', '?')}: the real service, audit trail on "
          f"(SQLite WAL synchronous=full unless on PostgreSQL), JSON lines to os.devnull; "
          f"panoramisk {_version('panoramisk')}; panoramisk-audit: one awaited aiosqlite "
          f"{_version('aiosqlite')} INSERT + commit per step (WAL, synchronous=full); panoramisk-store: "
          f"calmline's three rows per session into calmline's schema, one commit at the step and one at the end")
    if pg is not None:
        print(f"PostgreSQL {pg.version} at {pg.url.split('@')[-1]}: "
              + ", ".join(f"{k}={v}" for k, v in pg.settings.items()))
    print("each server in its own process; one client process; answers sent at once; garbage "
          "collector tuned as `calmline serve` does it for calmline "
          + ("and the peers" if args.peers_gc else "only (--peers-gc: for all)"))
    print("glibc malloc in the servers: " + (
        "dynamic thresholds (--malloc-as-is)" if args.malloc_as_is
        else ", ".join(f"{k}={v}" for k, v in PINNED_MALLOC.items())))
    print(f"{args.repeat} interleaved runs per row ({args.burst_repeat} per burst row), tables show "
          f"medians; warm-up errors: {warmup}")
    print(f"machine before the run: {busy_before}, load average {load_before}; after: "
          f"{_loadavg()}; total time {elapsed:.0f} s")
    if t_results:
        print("\n== throughput (closed loop) ==")
        print_throughput(t_results)
        print_threads(t_results)
        print_audit(t_results)
    if b_results:
        print(f"\n== burst: {args.burst_rate:.0f} sessions/s offered for {args.burst_seconds:g} s, "
              f"durable commits ==")
        print_burst(b_results)
    if s_results:
        print(f"\n== stores at concurrency {args.stores_concurrency} ==")
        print_stores(s_results)
    print("\nprocesses and memory of each server after the runs (/proc; the process, its "
          "descendants, their threads, RSS):")
    for name, m in memory.items():
        print(f"  {name:<17} {m['processes']} process{'es' if m['processes'] != 1 else ''}, "
              f"{m['threads']} threads, RSS {m['rss_kib'] / 1024:.1f} MiB (peak {m['peak_rss_kib'] / 1024:.1f} MiB)")
    print("  (each server process also holds the benchmark's pipe thread and its executor)")
    for name, final in finals.items():
        ok = "ok" if final["steps"] == final["expected_steps"] else "MISMATCH"
        print(f"{name} store after stop: {final['events']} events, {final['steps']} step events, "
              f"expected {final['expected_steps']} (one per completed session, warm-up included): "
              f"{ok}; {final['commits']} commits by the service")
        if "xact_commit" in final:
            print(f"  pg_stat_database xact_commit for its database over the whole run: "
                  f"{final['xact_commit']} (the services' audit commits {final['commits']}, the "
                  f"benchmark's counting {final['count_queries']}; the rest: startup, migrations, "
                  f"the outbox worker's polls)")
    print()
    rs = ratios(t_results, b_results, s_results)
    for ratio in rs:
        verdict = "" if ratio["target"] is None else (
            f" (target {ratio['target']}): " + ("target met" if ratio["met"] else "target missed"))
        print(f"ratio: {ratio['name']} = {ratio['value']:.2f}{'x' if 'ms' not in ratio['name'] else ''}"
              f"{verdict or ' (for information)'}")
    if profile:
        print(f"\n==== cProfile of the calmline server process, loop thread, concurrency {max(levels)} ====")
        print(profile)

    if args.json:
        payload = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loop": "uvloop" if args.uvloop else "asyncio",
            "server_malloc": "dynamic" if args.malloc_as_is else PINNED_MALLOC,
            "server_malloc_seen": {name: t.handles[0].malloc for name, t in targets.items()},
            "postgresql": None if pg is None else {"version": pg.version, **pg.settings},
            "repeat": args.repeat,
            "machine_before": busy_before,
            "loadavg_before": load_before,
            "loadavg_after": _loadavg(),
            "warmup_errors": warmup,
            "results": [asdict(r) for r in t_results],
            "burst": [asdict(r) for r in b_results],
            "stores": [asdict(r) for r in s_results],
            "memory": memory,
            "finals": finals,
            "ratios": rs,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
