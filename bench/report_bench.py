"""Time `calmline report` over 90 days (and over yesterday) at 10k, 100k and 1M events.

Each store is built once with big_store.py (kept in --dir, reused when its size matches), then
each report runs in a fresh process, as `calmline report` does, so that its peak RSS (VmHWM)
is its own. Figures print side by side so that the growth shows:

    python3 bench/report_bench.py                       # SQLite, 10k/100k/1M, stores in /tmp
    python3 bench/report_bench.py --postgresql postgresql://postgres@127.0.0.1:15432/postgres
    # also: --sizes 10000,100000 --dir DIR --repeat 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "agi"))
sys.path.insert(0, str(ROOT / "bench"))


def child(url: str, days: int) -> None:
    """One report, as `calmline report --days N` builds it; prints timings and peak RSS as JSON."""
    from calmline.audit.report import build_report, render_html
    from calmline.store import Database

    started = time.perf_counter()
    db = Database(url)
    now = datetime.now(timezone.utc)
    today = datetime.combine(now.date(), datetime.min.time(), timezone.utc)
    if days == 1:  # yesterday, the last whole day of the history big_store.py writes
        since, until = today - timedelta(days=1), today
    else:  # as `calmline report --days N` asks
        since, until = today - timedelta(days=days - 1), None
    report = build_report(db, since=since, until=until, now=now, console_url="https://console.example")
    counted = time.perf_counter()
    page = render_html(report)
    done = time.perf_counter()
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"count_s": counted - started, "render_s": done - counted, "total_s": done - started,
                      "rss_mb": hwm / 1024, "calls": report.call_count, "escalations": report.escalations,
                      "page_kb": len(page.encode()) / 1024}))


def run_child(url: str, days: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", url, "--days", str(days)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"report on {url} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def _event_count(url: str) -> int:
    from calmline.store import Database

    try:
        conn = Database(url).connect()
        try:
            return conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        finally:
            conn.close()
    except Exception:  # noqa: BLE001 - no store yet
        return 0


def _pg_database(server: str, name: str) -> str:
    """The URL of database `name` on the server, created when missing."""
    import psycopg

    with psycopg.connect(server, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(server)
    return urlunsplit(parts._replace(path=f"/{name}"))


def store_for(engine: str, size: int, args: argparse.Namespace) -> str:
    import big_store

    if engine == "sqlite":
        url = f"sqlite:///{(args.dir / f'report-bench-{size}.sqlite3').resolve()}"
    else:
        url = _pg_database(args.postgresql, f"report_bench_{size}")
    have = _event_count(url)
    if have and abs(have - size) <= size // 100:
        return url
    if have:
        raise SystemExit(f"{url} holds {have} events, not about {size}: remove it first")
    print(f"building {engine} store of {size:,} events ...", file=sys.stderr, flush=True)
    built = big_store.build(url, size, progress=lambda done, target: print(
        f"  {done:>9,} / {target:,}", file=sys.stderr, flush=True))
    print(f"  {built.events:,} events, {built.sessions:,} sessions, {built.calls:,} calls in {built.seconds:.0f}s",
          file=sys.stderr, flush=True)
    if engine == "postgresql":  # what autovacuum does soon after a load: statistics, visibility map
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE events")
    return url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dir", type=Path, default=Path("/tmp"), help="where the SQLite stores are kept")
    parser.add_argument("--postgresql", help="a server URL to build and time the stores on PostgreSQL too")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="runs per report; the table shows the median")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--days", type=int, default=90, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.days)
        return 0
    engines = ([] if args.no_sqlite else ["sqlite"]) + (["postgresql"] if args.postgresql else [])
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{'engine':<11} {'events':>9} {'days':>4} {'calls':>7} {'escalations':>11} "
          f"{'count s':>8} {'render s':>8} {'total s':>8} {'peak RSS MB':>11}")
    for engine in engines:
        for size in sizes:
            url = store_for(engine, size, args)
            for days in (90, 1):
                runs = sorted((run_child(url, days) for _ in range(args.repeat)), key=lambda r: r["total_s"])
                r = runs[len(runs) // 2]
                print(f"{engine:<11} {size:>9,} {days:>4} {r['calls']:>7,} {r['escalations']:>11,} "
                      f"{r['count_s']:>8.2f} {r['render_s']:>8.2f} {r['total_s']:>8.2f} {r['rss_mb']:>11.0f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
