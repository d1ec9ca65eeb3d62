#!/usr/bin/env python3
"""FastAGI throughput and latency: calmline vs panoramisk vs a bare asyncio server.

This script plays Asterisk's side of FastAGI over loopback. Each server runs the same
warn session (the same 4 commands, the same answers) in its own process. One asyncio
client process drives N sessions at a fixed concurrency and answers each command at once.

    python bench/fastagi_bench.py [--sessions N] [--concurrency 1,50] [--quick]
                                  [--uvloop] [--json PATH] [--profile]

Servers:
  calmline      the real service (`calmline.service.build`), with the production audit
                trail: SQLite WAL, synchronous="full", a temp database file, JSON lines
                echoed to os.devnull.
  panoramisk    `panoramisk.fast_agi.Application` with a 'warn' route that sends the same
                4 commands through `request.send_command`.
  bare-asyncio  `asyncio.start_server` handler: read the env to the blank line, send
                4 commands, read one answer line each, close. The ceiling for Python.

Reported per server and concurrency: sessions/s (sessions / wall time), time to the
first command (client finished writing the environment -> first command line received)
p50/p99, whole-session p50, server and client CPU per session, and the error count (a
session is an error unless it got exactly the 4 expected commands in order and then
the server closed). Nothing here fails on speed; the ratio lines say met or missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
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
SERVERS = ("calmline", "panoramisk", "bare-asyncio")
SESSION_TIMEOUT = 15.0
# glibc's malloc settings for every server process (bench/README.md, sixth pass).
# asyncio reads a plain protocol's socket with recv(256 KiB); left to glibc's dynamic
# thresholds, whether that buffer comes from the heap (~1.4 us a read) or from mmap (~12 us)
# depends on the process's allocation history, down to one 4 KiB object at import. Pinned,
# every server reads from the heap: the peers are measured at their best.
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


async def _start(kind: str, tmpdir: str, state: dict, peers_gc: bool) -> tuple[str, int]:
    if kind == "calmline":
        from calmline import service as service_module
        from calmline.config import Config

        config = Config.model_validate({
            "server": {"host": "127.0.0.1", "port": 0},
            "store": {"url": "sqlite:///" + os.path.join(tmpdir, "calmline.sqlite3")},
            "audit": {"stdout": True},
        })
        state["devnull"] = open(os.devnull, "w", encoding="utf-8")
        svc = service_module.build(config, stdout=state["devnull"])
        state["service"] = svc
        address = await svc.start()
        service_module.tune_gc()  # as `calmline serve` does
        return address
    if kind == "panoramisk":
        from panoramisk.fast_agi import Application

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


def _db_counts(path: str) -> dict:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        total = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        steps = conn.execute("SELECT count(*) FROM events WHERE event = 'step'").fetchone()[0]
    finally:
        conn.close()
    return {"events": total, "steps": steps}


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


def _process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) of another process, from /proc (10 ms ticks)."""
    return (_stat_cpu(f"/proc/{pid}/stat") or 0.0) if pid is not None else 0.0


def _snapshot(kind: str, state: dict) -> dict:
    """CPU so far and, for calmline, the audit figures once everything queued is committed.

    `cpu`/`threads` are read before the database is counted and `cpu_end`/`threads_end`
    after, so that a run's CPU (this snapshot's `cpu` minus the previous one's `cpu_end`)
    leaves out the counting, which is the benchmark's work, not the server's.
    """
    if kind != "calmline":
        return {"cpu": time.process_time(), "threads": _thread_cpu()}
    svc = state["service"]
    svc.store.flush(30.0)

    def clocks() -> tuple[float, dict[str, float]]:
        return time.process_time(), _thread_cpu()

    snap: dict = {}
    snap["cpu"], snap["threads"] = clocks()
    snap.update(_db_counts(str(svc.store.db.path)))
    snap["commits"] = svc.store.commits
    snap["cpu_end"], snap["threads_end"] = clocks()
    return snap


async def _serve(kind: str, conn, tmpdir: str, peers_gc: bool) -> None:
    import cProfile
    import io
    import pstats

    state: dict = {}
    loop = asyncio.get_running_loop()
    profiler: cProfile.Profile | None = None
    try:
        host, port = await _start(kind, tmpdir, state, peers_gc)
        conn.send({"port": port, "loop": type(loop).__module__ + "." + type(loop).__name__,
                   "tmpdir": tmpdir, "malloc": {k: os.environ.get(k) for k in PINNED_MALLOC}})
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
                stats.sort_stats(os.environ.get("BENCH_PROFILE_SORT", "tottime")).print_stats(message[1])
                stats.sort_stats("cumulative").print_stats(message[1])
                profiler = None
                conn.send(out.getvalue())
            elif op == "stop":
                final: dict = {}
                if kind == "calmline":
                    svc = state["service"]
                    await svc.stop(grace=5.0)
                    state["devnull"].close()
                    final = _db_counts(str(svc.store.db.path))
                    final["commits"] = svc.store.commits
                else:
                    state["server"].close()
                conn.send(final)
                return
    finally:
        if "devnull" in state and not state["devnull"].closed:
            state["devnull"].close()


def server_process(kind: str, conn, use_uvloop: bool, tmpdir: str, peers_gc: bool) -> None:
    with asyncio.Runner(loop_factory=_new_loop_factory(use_uvloop)) as runner:
        runner.run(_serve(kind, conn, tmpdir, peers_gc))


class ServerHandle:
    def __init__(self, kind: str, use_uvloop: bool, peers_gc: bool = False):
        ctx = mp.get_context("spawn")
        self.kind = kind
        self.conn, child = ctx.Pipe()
        # The parent owns the temp directory, so it is removed even if the child dies.
        self.tmpdir = tempfile.mkdtemp(prefix=f"fastagi-bench-{kind}-")
        self.process = ctx.Process(target=server_process,
                                   args=(kind, child, use_uvloop, self.tmpdir, peers_gc),
                                   name=f"bench-{kind}", daemon=True)
        self.process.start()
        if not self.conn.poll(60):
            self.close()
            raise RuntimeError(f"{kind} server did not start")
        info = self.conn.recv()
        self.port: int = info["port"]
        self.warm_sessions = 0
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
        shutil.rmtree(self.tmpdir, ignore_errors=True)


# --------------------------------------------------------------------------- client


_CHUNK = memoryview(bytearray(4096))  # every client reads into this, one read at a time


class AGIClient(asyncio.BufferedProtocol):
    """Asterisk's side of one session: send the env, answer each expected command at once.

    Buffered, as Asterisk reads into a fixed buffer: a plain protocol's reads are
    `recv(256 KiB)`, which glibc may serve with mmap + munmap at ~11 us each depending on
    this process's heap, a cost that would then come and go with the client, not the server.
    """

    __slots__ = ("env", "done", "transport", "buf", "index", "t_env", "t_first", "error")

    def __init__(self, env: bytes, done: asyncio.Future):
        self.env = env
        self.done = done
        self.buf = b""
        self.index = 0
        self.t_env = self.t_first = 0.0
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


@dataclass
class RunResult:
    server: str
    concurrency: int
    sessions: int
    wall_s: float
    sessions_per_s: float
    first_cmd_p50_ms: float
    first_cmd_p99_ms: float
    session_p50_ms: float
    session_p99_ms: float
    errors: int
    server_cpu_us_per_session: float
    client_cpu_pct: float
    server_cpu_pct: float
    server_threads_us_per_session: dict[str, float] = field(default_factory=dict)
    audit_events: int | None = None
    audit_steps: int | None = None
    audit_commits: int | None = None
    repeats: int = 1
    sessions_per_s_runs: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


async def drive(port: int, sessions: int, concurrency: int, template: str) -> dict:
    """Run `sessions` sessions, `concurrency` at a time; return raw timings and errors."""
    loop = asyncio.get_running_loop()
    first: list[float] = []
    whole: list[float] = []
    errors: list[str] = []
    counter = iter(range(sessions))

    async def one(n: int) -> None:
        done = loop.create_future()
        env = (template % n).encode()
        t0 = time.perf_counter()
        try:
            transport, proto = await loop.create_connection(
                lambda: AGIClient(env, done), "127.0.0.1", port)
        except OSError as exc:
            errors.append(f"connect: {exc}")
            return
        try:
            async with asyncio.timeout(SESSION_TIMEOUT):
                exc = await done
        except TimeoutError:
            transport.abort()
            errors.append(f"timeout after {proto.index} commands")
            return
        t1 = time.perf_counter()
        if proto.error:
            errors.append(proto.error)
        elif exc is not None:
            errors.append(f"connection lost after {proto.index} commands: {exc}")
        elif proto.index != len(EXPECTED) or proto.buf:
            errors.append(f"server closed after {proto.index} commands (trailing {proto.buf[:40]!r})")
        else:
            first.append(proto.t_first - proto.t_env)
            whole.append(t1 - t0)

    async def worker() -> None:
        for n in counter:
            await one(n)

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {"first": first, "whole": whole, "errors": errors, "wall": wall, "cpu": cpu}


def measure(handle: ServerHandle, client: asyncio.Runner, sessions: int, concurrency: int,
            template: str) -> RunResult:
    before = handle.ask("snapshot")
    raw = client.run(drive(handle.port, sessions, concurrency, template))
    after = handle.ask("snapshot")
    first = sorted(raw["first"])
    whole = sorted(raw["whole"])
    server_cpu = after["cpu"] - before.get("cpu_end", before["cpu"])
    before_threads = before.get("threads_end", before["threads"])
    result = RunResult(
        server=handle.kind,
        concurrency=concurrency,
        sessions=sessions,
        wall_s=raw["wall"],
        sessions_per_s=sessions / raw["wall"],
        sessions_per_s_runs=[sessions / raw["wall"]],
        first_cmd_p50_ms=_pct(first, 0.50) * 1e3,
        first_cmd_p99_ms=_pct(first, 0.99) * 1e3,
        session_p50_ms=_pct(whole, 0.50) * 1e3,
        session_p99_ms=_pct(whole, 0.99) * 1e3,
        errors=len(raw["errors"]),
        server_cpu_us_per_session=server_cpu / sessions * 1e6,
        client_cpu_pct=raw["cpu"] / raw["wall"] * 100,
        server_cpu_pct=server_cpu / raw["wall"] * 100,
        error_samples=raw["errors"][:5],
        server_threads_us_per_session={
            name: round((cpu - before_threads.get(name, 0.0)) / sessions * 1e6)
            for name, cpu in after["threads"].items()
        },
    )
    if "commits" in after:
        result.audit_events = after["events"] - before["events"]
        result.audit_steps = after["steps"] - before["steps"]
        result.audit_commits = after["commits"] - before["commits"]
    return result


def combine(runs: list[RunResult]) -> RunResult:
    """Repeats of one (server, concurrency): medians of the per-run figures, sums of counts."""
    med = statistics.median
    first = runs[0]
    threads = {name for r in runs for name in r.server_threads_us_per_session}
    audited = first.audit_commits is not None
    return RunResult(
        server=first.server,
        concurrency=first.concurrency,
        sessions=sum(r.sessions for r in runs),
        wall_s=sum(r.wall_s for r in runs),
        sessions_per_s=med(r.sessions_per_s for r in runs),
        first_cmd_p50_ms=med(r.first_cmd_p50_ms for r in runs),
        first_cmd_p99_ms=med(r.first_cmd_p99_ms for r in runs),
        session_p50_ms=med(r.session_p50_ms for r in runs),
        session_p99_ms=med(r.session_p99_ms for r in runs),
        errors=sum(r.errors for r in runs),
        server_cpu_us_per_session=med(r.server_cpu_us_per_session for r in runs),
        client_cpu_pct=med(r.client_cpu_pct for r in runs),
        server_cpu_pct=med(r.server_cpu_pct for r in runs),
        server_threads_us_per_session={
            name: med(r.server_threads_us_per_session.get(name, 0) for r in runs) for name in threads
        },
        audit_events=sum(r.audit_events for r in runs) if audited else None,
        audit_steps=sum(r.audit_steps for r in runs) if audited else None,
        audit_commits=sum(r.audit_commits for r in runs) if audited else None,
        repeats=len(runs),
        sessions_per_s_runs=[round(r.sessions_per_s) for r in runs],
        error_samples=[e for r in runs for e in r.error_samples][:5],
    )


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# --------------------------------------------------------------------------- report


def print_table(results: list[RunResult]) -> None:
    header = (f"{'server':<13}{'conc':>5}{'sessions':>9}{'sessions/s':>12}{'(min-max)':>13}"
              f"{'first-cmd p50 ms':>18}{'p99 ms':>8}{'session p50 ms':>16}{'p99 ms':>8}"
              f"{'srv CPU us/sess':>17}{'srv CPU%':>9}{'cli CPU%':>9}{'errors':>8}")
    print(header)
    print("-" * len(header))
    last = None
    for r in sorted(results, key=lambda r: (r.concurrency, SERVERS.index(r.server))):
        if last is not None and r.concurrency != last:
            print()
        last = r.concurrency
        spread = f"{min(r.sessions_per_s_runs):.0f}-{max(r.sessions_per_s_runs):.0f}"
        print(f"{r.server:<13}{r.concurrency:>5}{r.sessions:>9}{r.sessions_per_s:>12.0f}{spread:>13}"
              f"{r.first_cmd_p50_ms:>18.3f}{r.first_cmd_p99_ms:>8.3f}"
              f"{r.session_p50_ms:>16.3f}{r.session_p99_ms:>8.3f}"
              f"{r.server_cpu_us_per_session:>17.0f}{r.server_cpu_pct:>9.0f}"
              f"{r.client_cpu_pct:>9.0f}{r.errors:>8}")
        for sample in r.error_samples:
            print(f"    error: {sample}")


def print_threads(results: list[RunResult]) -> None:
    print("\nserver CPU by thread, us/session (/proc, 10 ms ticks; loop = event-loop thread):")
    for r in sorted(results, key=lambda r: (SERVERS.index(r.server), r.concurrency)):
        parts = ", ".join(f"{name} {us}" for name, us in sorted(r.server_threads_us_per_session.items()))
        print(f"  {r.server:<13} conc {r.concurrency:>3}: {parts}")


def print_audit(results: list[RunResult], finals: dict) -> None:
    print("\naudit trail, totals over the measured runs of each row (events written, step events, "
          "SQLite commits):")
    for r in sorted(results, key=lambda r: (SERVERS.index(r.server), r.concurrency)):
        if r.audit_commits is None:
            print(f"  {r.server:<13} conc {r.concurrency:>3}: no audit trail (0 events, 0 commits)")
            continue
        per = r.audit_events / r.audit_commits if r.audit_commits else float("nan")
        ok = "ok" if r.audit_steps == r.sessions - r.errors else "MISMATCH"
        print(f"  {r.server:<13} conc {r.concurrency:>3}: {r.audit_events} events, "
              f"{r.audit_steps} step events for {r.sessions} sessions ({ok}), "
              f"{r.audit_commits} commits ({per:.1f} events/commit, "
              f"{r.sessions / r.audit_commits if r.audit_commits else float('nan'):.2f} sessions/commit)")
    calm = finals.get("calmline")
    if calm:
        ok = "ok" if calm["steps"] == calm["expected_steps"] else "MISMATCH"
        print(f"  calmline database after stop: {calm['events']} events, {calm['steps']} step "
              f"events, expected {calm['expected_steps']} (one per completed session, warm-up "
              f"included): {ok}; {calm['commits']} commits in all")


def ratios(results: list[RunResult]) -> list[dict]:
    by = {(r.server, r.concurrency): r for r in results}
    out = []
    a, b = by.get(("calmline", 50)), by.get(("panoramisk", 50))
    if a and b:
        value = a.sessions_per_s / b.sessions_per_s
        out.append({"name": "calmline/panoramisk sessions/s @50", "value": value,
                    "target": ">= 1.0", "met": value >= 1.0})
    a, b = by.get(("calmline", 1)), by.get(("bare-asyncio", 1))
    if a and b:
        value = a.first_cmd_p50_ms / b.first_cmd_p50_ms
        out.append({"name": "calmline/bare first-cmd p50 @1", "value": value,
                    "target": "<= 1.3", "met": value <= 1.3})
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=None,
                        help="sessions per measured run (default: 1000 at concurrency 1, "
                             "3000 at higher concurrency; a tenth with --quick)")
    parser.add_argument("--concurrency", default="1,50",
                        help="comma-separated concurrency levels (default 1,50)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the sessions")
    parser.add_argument("--repeat", type=int, default=5,
                        help="measured runs per server and concurrency, interleaved; the "
                             "table shows medians (default 5)")
    parser.add_argument("--uvloop", action="store_true",
                        help="run the servers (and the client) on uvloop")
    parser.add_argument("--peers-gc", action="store_true",
                        help="give panoramisk and bare-asyncio calmline's garbage collector "
                             "settings too (like for like; by default only calmline has them)")
    parser.add_argument("--malloc-as-is", action="store_true",
                        help="leave glibc's malloc thresholds dynamic in the server processes "
                             "(by default they are pinned so that no server's socket reads go "
                             "through mmap by accident of its heap layout)")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"comma-separated subset of {','.join(SERVERS)}")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--profile", action="store_true",
                        help="after measuring, one extra cProfile'd calmline run per "
                             "concurrency (loop thread only); prints the top functions")
    parser.add_argument("--profile-top", type=int, default=25)
    args = parser.parse_args(argv)

    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    servers = [s for s in args.servers.split(",") if s]
    for s in servers:
        if s not in SERVERS:
            parser.error(f"unknown server {s!r}")
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
    if "panoramisk" in servers:
        import panoramisk  # noqa: F401

    template = environment_template()
    started = time.time()
    load_before = _loadavg()
    handles: dict[str, ServerHandle] = {}
    if not args.malloc_as_is:
        os.environ.update(PINNED_MALLOC)  # read by each server process's malloc at its start
    try:
        for kind in servers:
            handles[kind] = ServerHandle(kind, args.uvloop, args.peers_gc)
        return _run(args, handles, levels, count, scale, template, started, load_before)
    finally:
        for handle in handles.values():
            handle.close()


def _run(args, handles, levels, count, scale, template, started, load_before) -> int:
    import calmline
    results: list[RunResult] = []
    finals: dict = {}
    warmup = {}
    profiles: dict[int, str] = {}
    with asyncio.Runner(loop_factory=_new_loop_factory(args.uvloop)) as client:
        client_loop = client.get_loop()
        # Warm-up: imports, code paths, SQLite pages, the socket layer; not reported.
        for kind, handle in handles.items():
            warm = measure(handle, client, max(50, 600 // scale), min(50, max(levels)), template)
            warm1 = measure(handle, client, max(20, 100 // scale), 1, template)
            warmup[kind] = warm.errors + warm1.errors
            handle.warm_sessions = warm.sessions + warm1.sessions - warm.errors - warm1.errors
        # Measured runs: interleave servers and repeats so drift hits all of them alike.
        runs: dict[tuple[str, int], list[RunResult]] = {}
        for rep in range(max(1, args.repeat)):
            for conc in levels:
                for kind, handle in handles.items():
                    r = measure(handle, client, count(conc), conc, template)
                    runs.setdefault((kind, conc), []).append(r)
                    print(f"  run {rep + 1}: {kind:<13} conc {conc:>3}: {r.sessions_per_s:8.0f} "
                          f"sessions/s, first-cmd p50 {r.first_cmd_p50_ms:.3f} ms, errors {r.errors}",
                          file=sys.stderr, flush=True)
        results = [combine(rs) for rs in runs.values()]
        if args.profile and "calmline" in handles:
            handle = handles["calmline"]
            for conc in levels:
                handle.ask("profile_start")
                r = measure(handle, client, count(conc), conc, template)
                profiles[conc] = handle.ask("profile_stop", args.profile_top)
                handle.warm_sessions += r.sessions - r.errors
        for kind, handle in handles.items():
            final = handle.stop()
            if kind == "calmline":
                completed = handle.warm_sessions + sum(
                    r.sessions - r.errors for r in results if r.server == kind)
                final["expected_steps"] = completed
                finals[kind] = final
    elapsed = time.time() - started

    loop_name = f"{type(client_loop).__module__}.{type(client_loop).__name__}"
    server_loops = {kind: h.loop for kind, h in handles.items()}
    print()
    print(f"FastAGI warn session x 4 commands, loopback, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"python {platform.python_version()} ({platform.python_implementation()}), "
          f"{platform.system()} {platform.release()}, CPUs: {os.cpu_count()}")
    print(f"event loop: {'uvloop' if args.uvloop else 'asyncio default'} "
          f"(servers: {', '.join(f'{k}={v}' for k, v in server_loops.items())}; client: {loop_name})")
    print(f"calmline {getattr(calmline, '__version__', '?')}, audit: SQLite WAL, synchronous=full, "
          f"temp database file, JSON lines to os.devnull; "
          f"panoramisk {_version('panoramisk')}")
    print("each server in its own process; one client process; answers sent at once; "
          "garbage collector tuned as `calmline serve` does it (calmline.service.tune_gc) for "
          + ("every server" if args.peers_gc else "calmline only (--peers-gc: for all)"))
    print("glibc malloc in the servers: " + (
        "dynamic thresholds, as each process's history left them (--malloc-as-is)" if args.malloc_as_is
        else ", ".join(f"{k}={v}" for k, v in PINNED_MALLOC.items())
        + " (no server's reads go through mmap; --malloc-as-is to leave them dynamic)"))
    print(f"{args.repeat} interleaved runs per row, table shows medians; sessions = total over runs; "
          f"warm-up errors: {warmup}")
    print(f"load average before/after: {load_before} / {_loadavg()} (other work on the machine "
          f"skews sessions/s; CPU us/session is steadier); total time {elapsed:.0f} s\n")
    print_table(results)
    print_threads(results)
    print_audit(results, finals)
    print()
    rs = ratios(results)
    for ratio in rs:
        print(f"ratio: {ratio['name']} = {ratio['value']:.2f}x (target {ratio['target']}): "
              f"{'target met' if ratio['met'] else 'target missed'}")
    for conc, text in profiles.items():
        print(f"\n==== cProfile of the calmline server process, loop thread, concurrency {conc} ====")
        print(text)

    if args.json:
        payload = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loop": "uvloop" if args.uvloop else "asyncio",
            "server_malloc": "dynamic" if args.malloc_as_is else PINNED_MALLOC,
            "server_malloc_seen": {kind: h.malloc for kind, h in handles.items()},
            "server_loops": server_loops,
            "audit": {"journal_mode": "wal", "synchronous": "full", "stdout": "os.devnull"},
            "repeat": args.repeat,
            "loadavg_before": load_before,
            "loadavg_after": _loadavg(),
            "warmup_errors": warmup,
            "results": [asdict(r) for r in results],
            "calmline_final": finals.get("calmline"),
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
