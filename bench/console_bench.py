"""Time every console page, with the filters a supervisor uses, on stores of growing size.

For each engine and size, a store is built through the real write path (bench/big_store.py:
AuditStore, the outbox) unless it is already there, the real console application is served by
uvicorn on a loopback port, and each page is fetched over HTTP by a logged-in client: the median
of 3 after one warm-up, and the first byte of the whole-range CSV. The table shows the growth.

    python3 bench/console_bench.py --sizes 10000,100000,1000000 --dir /tmp/console-bench \\
        [--postgres postgresql://postgres@127.0.0.1:5432/postgres]

With --postgres, the stores are databases `calmline_bench_<size>` on that server (created if
absent). Goals (issue 15): every page within 1 s at 1M events; memory flat as the store grows.
"""

from __future__ import annotations

import argparse
import re
import resource
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agi"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from calmline.config import parse  # noqa: E402
from calmline.console.accounts import Accounts  # noqa: E402
from calmline.console.app import create_app  # noqa: E402
from calmline.store import Database  # noqa: E402

PASSWORD = "bench password 1"


def pages(conn) -> list[tuple[str, str]]:
    """(label, path): the pages with the filters a supervisor types, picked from the store."""
    agent, number, linkedid = conn.execute(
        "SELECT endpoint, caller_number, linkedid FROM escalations WHERE kind = 'final_warning' "
        "ORDER BY ts DESC LIMIT 1").fetchone()
    busiest = conn.execute(
        "SELECT caller_number FROM escalations WHERE caller_number LIKE '+%' GROUP BY caller_number "
        "ORDER BY COUNT(*) DESC LIMIT 1").fetchone()[0]
    return [
        ("calls, last 30 days (default)", "/calls"),
        ("calls, 90 days", "/calls?since="),
        ("calls, 90 days, page 200", "/calls?since=&page=200"),
        ("calls, 90 days, sorted by caller", "/calls?since=&sort=caller&order=asc"),
        ("calls, final warnings, 90 days", "/calls?since=&kind=final_warning"),
        ("calls, one agent, 90 days", f"/calls?since=&agent={quote(agent)}"),
        ("calls, caller 'mar' (30 days)", "/calls?caller=mar"),
        ("calls, busiest number, 90 days", f"/calls?since=&number={quote(busiest)}"),
        ("calls, mail failed, 90 days", "/calls?since=&mail=failed"),
        ("call page", f"/calls/{quote(linkedid, safe='')}"),
        ("agents, 90 days", "/agents?since="),
        ("agents, last 30 days", "/agents"),
        ("repeat callers, 90 days", "/callers?since="),
        ("trends, 90 days", "/trends"),
        ("live (the page)", "/live"),
    ]


class Served:
    """The console application on a free loopback port, in a thread of this process."""

    def __init__(self, db: Database):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        app = create_app(parse(""), db, "b" * 48, None)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def login(base: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=120)
    form = client.get("/login").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    answer = client.post("/login", data={"username": "bench", "password": PASSWORD, "csrf": csrf})
    assert answer.status_code in (200, 303), answer.status_code
    return client


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(url: str, repeat: int = 3) -> dict[str, float]:
    db = Database(url)
    db.open_checked()
    accounts = Accounts(db)
    if not accounts.exists("bench"):
        accounts.add("bench", PASSWORD)
    conn = db.connect()
    try:
        chosen = pages(conn)
        events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    finally:
        conn.close()
    served = Served(db)
    figures: dict[str, float] = {"events": events}
    try:
        client = login(f"http://127.0.0.1:{served.port}")
        for label, path in chosen:
            times = []
            for _ in range(repeat + 1):
                started = time.perf_counter()
                answer = client.get(path)
                times.append(time.perf_counter() - started)
                assert answer.status_code == 200, (path, answer.status_code)
            figures[label] = statistics.median(times[1:])
        for label, path, lines in (("CSV first call, 90 days", "/calls.csv?since=", 2),
                                   ("CSV first call, 30 days", "/calls.csv", 2),
                                   ("live: first event (30 min)", "/live/stream", 3)):
            firsts = []
            for _ in range(repeat):
                started = time.perf_counter()
                with client.stream("GET", path) as answer:
                    seen = b""
                    for chunk in answer.iter_raw():  # the header line, then the first call's line
                        seen += chunk
                        if seen.count(b"\n") >= lines:
                            break
                    firsts.append(time.perf_counter() - started)
            figures[label] = statistics.median(firsts)
        started = time.perf_counter()
        size = len(client.get("/calls.csv?since=").content)
        figures["CSV whole, 90 days"] = time.perf_counter() - started
        figures["CSV size MB"] = size / 2**20
        client.close()
    finally:
        served.stop()
    figures["RSS MB"] = rss_mb()
    return figures


def ensure(url: str, events: int) -> None:
    """Build the store through the real write path unless it already holds events."""
    db = Database(url)
    try:
        conn = db.connect()
        try:
            have = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        finally:
            conn.close()
    except Exception:
        have = 0
    if have:
        return
    from big_store import build

    print(f"building {url} with {events:,} events ...", file=sys.stderr, flush=True)
    build(url, events)


def pg_database(server: str, events: int) -> str:
    import psycopg

    name = f"calmline_bench_{events}"
    with psycopg.connect(server, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(server)._replace(path="/" + name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/calmline-console-bench"),
                        help="where the SQLite stores are kept (and reused)")
    parser.add_argument("--postgres", default=None, help="a server URL: also measure PostgreSQL")
    parser.add_argument("--no-sqlite", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    runs: dict[tuple[str, int], dict[str, float]] = {}
    engines = ([] if args.no_sqlite else ["sqlite"]) + (["postgresql"] if args.postgres else [])
    for engine in engines:
        for size in sizes:
            if engine == "sqlite":
                args.dir.mkdir(parents=True, exist_ok=True)
                url = f"sqlite:///{(args.dir / f'console-{size}.sqlite3').resolve()}"
            else:
                url = pg_database(args.postgres, size)
            ensure(url, size)
            runs[(engine, size)] = measure(url)
            print(f"measured {engine} {size:,}", file=sys.stderr, flush=True)
    columns = list(runs)
    labels = [k for k in next(iter(runs.values())) if k != "events"]
    head = f"{'seconds (median of 3)':<36}" + "".join(
        f"{(e[:6] + ' ' + (f'{s // 1000}k' if s < 10**6 else f'{s // 10**6}M')):>12}" for e, s in columns)
    print(head)
    print(f"{'events in the store':<36}" + "".join(f"{runs[c]['events']:>12,.0f}" for c in columns))
    for label in labels:
        print(f"{label:<36}" + "".join(f"{runs[c][label]:>12.3f}" for c in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
