#!/usr/bin/env python3
"""How long the `lookup` request path's query takes as the store grows: p50/p99 at 10k,
100k and 1M events.

Each store is built by `bench/big_store.py` (the service's own write path, 90 days, 200
agents; 1% of calls from one very frequent caller, 15% from 400 regulars, 3% withheld) and
migrated like the service's (every index). The timed part is exactly what a lookup
session does off the event loop: `CallerLookups.record(number, days)` on a kept connection,
for a mix of repeat callers, one-time callers and numbers never seen.

    PYTHONPATH=agi python3 bench/lookup_bench.py                     # 10k, 100k, 1M on SQLite
    PYTHONPATH=agi python3 bench/lookup_bench.py --sizes 10000 --queries 500
    PYTHONPATH=agi python3 bench/lookup_bench.py --url postgresql://postgres@127.0.0.1:15432/bench
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "agi"))

sys.path.insert(0, str(ROOT / "bench"))

from calmline.actions.lookup import CallerLookups  # noqa: E402
from calmline.audit.history import ESCALATION_PATHS, ESCALATION_WHERE, is_withheld  # noqa: E402
from calmline.store import Database  # noqa: E402

NOW = datetime.now(timezone.utc)


def fill(url: str, events: int) -> Counter:
    """Build the store with `big_store.build` (the service's own write path, 90 days); return
    each caller number's escalated calls as it tallied them."""
    from big_store import build

    built = build(url, events, end=NOW)
    return built.truth.callers


def callers_in(db: Database) -> Counter:
    """For a store built earlier: each number's escalated calls, counted from the store."""
    conn = db.connect()
    try:
        rows = conn.execute(f"SELECT caller_number, COUNT(DISTINCT COALESCE(linkedid, session)) FROM events "
                            f"WHERE {ESCALATION_WHERE} GROUP BY caller_number", ESCALATION_PATHS).fetchall()
    finally:
        conn.close()
    return Counter({number: count for number, count in rows if number})


def measure(db: Database, counts: Counter, queries: int, days: int, seed: int = 7) -> dict:
    rng = random.Random(seed)
    counts = Counter({n: c for n, c in counts.items() if not is_withheld(n)})
    known = sorted(counts)
    repeaters = [n for n, _ in counts.most_common(20)]
    lookups = CallerLookups(db, workers=1)
    samples, cpu = [], []
    try:
        for i in range(queries + 50):
            pick = rng.random()
            if pick < 0.3 and repeaters:
                number = rng.choice(repeaters)
            elif pick < 0.8:
                number = rng.choice(known)
            else:
                number = f"+1777{rng.randrange(10**7):07d}"  # never seen
            started, started_cpu = time.perf_counter(), time.thread_time()
            lookups.record(number, days)
            if i >= 50:  # the first ones warm the connection and the page cache
                samples.append((time.perf_counter() - started) * 1000)
                cpu.append((time.thread_time() - started_cpu) * 1000)
    finally:
        lookups.close()
    samples.sort()
    cpu.sort()
    return {"p50_ms": statistics.median(samples), "p99_ms": samples[int(len(samples) * 0.99) - 1],
            "max_ms": samples[-1], "queries": len(samples),
            "cpu_p50_ms": statistics.median(cpu), "cpu_p99_ms": cpu[int(len(cpu) * 0.99) - 1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="events per store")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--url", default=None, help="a PostgreSQL URL (an empty database) instead of SQLite files")
    parser.add_argument("--dir", type=Path, default=None, help="keep the SQLite stores here (reused when present)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.dir or Path(tempfile.mkdtemp(prefix="calmline-lookup-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"lookup bench: CallerLookups.record(number, days={args.days}), {args.queries} lookups per store "
          f"(30% the 20 most frequent callers, 50% other callers, 20% numbers never seen)")
    print("wall: time.perf_counter around the call; cpu: time.thread_time (the query's own CPU,")
    print("without the waits of a machine shared with other work)")
    print(f"{'events':>10} {'store':<10} {'fill s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'cpu p50':>8} {'cpu p99':>8}")
    for size in sizes:
        if args.url:
            url, reuse, kind = args.url, False, "postgresql"
            db = Database(url)
            db.open_checked()
            conn = db.connect()
            conn.execute("TRUNCATE events, outbox")
            conn.close()
        else:
            path = work / f"lookup-{size}.sqlite3"
            url, reuse, kind = f"sqlite:///{path.resolve()}", path.exists(), "sqlite"
        started = time.perf_counter()
        counts = fill(url, size) if not reuse else None
        filled = time.perf_counter() - started
        db = Database(url)
        db.open_checked()  # the index the lookup reads is a migration: a store built before gets it
        conn = db.connect()
        conn.execute("ANALYZE" if kind == "sqlite" else "ANALYZE events")
        conn.close()
        if counts is None:
            counts = callers_in(db)
        conn = db.connect()
        count = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        conn.close()
        result = measure(db, counts, args.queries, args.days)
        print(f"{count:>10} {kind:<10} {filled:>8.1f} {result['p50_ms']:>8.3f} {result['p99_ms']:>8.3f} "
              f"{result['max_ms']:>8.3f} {result['cpu_p50_ms']:>8.3f} {result['cpu_p99_ms']:>8.3f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
