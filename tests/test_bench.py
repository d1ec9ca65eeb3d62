"""The benchmark script runs from a checkout and measures what it says it measures.

Not a speed test: it checks that every session completed, that calmline's audit trail got
one step per session, that the burst and the memory figures come out, and that the servers
really ran with the malloc settings the header claims (a setting applied after the servers start would silently measure the peers in
glibc's mmap regime again; bench/README.md, sixth pass).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "fastagi_bench.py"
PINNED = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "4194304"}


def run_bench(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    env_clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--parts", "throughput,burst",
         "--servers", "calmline,panoramisk-store,panoramisk-audit,bare-asyncio", "--concurrency", "1,5",
         "--sessions", "40", "--repeat", "1", "--burst-servers", "calmline",
         "--burst-rate", "40", "--burst-seconds", "1", "--burst-repeat", "1",
         "--json", str(out), *extra],
        cwd=tmp_path, env=env_clean, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


@pytest.mark.parametrize("as_is", [False, True])
def test_bench_completes_every_session_with_the_malloc_it_reports(tmp_path, as_is):
    result, stdout = run_bench(tmp_path, *(["--malloc-as-is"] if as_is else []))
    servers = ("calmline", "panoramisk-store", "panoramisk-audit", "bare-asyncio")
    rows = {(r["server"], r["concurrency"]): r for r in result["results"]}
    assert set(rows) == {(s, c) for s in servers for c in (1, 5)}
    for row in rows.values():
        assert row["errors"] == 0 and row["sessions"] == 40
        assert 0 < row["first_cmd_p50_ms"] <= row["prompt_p50_ms"] <= row["session_p50_ms"]
    for conc in (1, 5):
        assert rows[("calmline", conc)]["audit_steps"] == 40
        # Both durable servers timed each step's commit; the bare server has none.
        assert rows[("calmline", conc)]["step_commit_p99_ms"] > 0
        assert rows[("panoramisk-audit", conc)]["step_commit_p99_ms"] > 0
        assert rows[("panoramisk-store", conc)]["step_commit_p99_ms"] > 0
        assert rows[("bare-asyncio", conc)]["step_commit_p99_ms"] is None
    final = result["finals"]["calmline"]
    assert final["steps"] == final["expected_steps"] > 0
    [burst] = result["burst"]
    assert burst["server"] == "calmline" and burst["sessions"] == 40 and burst["errors"] == 0
    assert 0 < burst["prompt_p99_ms"] <= burst["session_p99_ms"]
    assert result["memory"]["calmline"]["processes"] == 1  # `calmline serve` is one process
    assert result["memory"]["calmline"]["rss_kib"] > 0
    seen = result["server_malloc_seen"]
    expected = {k: None for k in PINNED} if as_is else PINNED
    assert seen == {s: expected for s in servers}
    assert ("dynamic thresholds" in stdout) is as_is
    assert "ratio: calmline/bare first-cmd p50 @1" in stdout
    assert "ratio: calmline/panoramisk-audit sessions/s @50" not in stdout  # no row at 50 here
    assert "ratio: calmline/panoramisk-store sessions/s @50" not in stdout
    assert "connect->first STREAM FILE p99" in stdout


def test_bench_stores_part_puts_every_step_in_each_store_and_counts_the_commits(tmp_path, postgres_url):
    out = tmp_path / "stores.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--parts", "stores", "--pg", postgres_url,
         "--stores-concurrency", "5", "--sessions", "40", "--repeat", "1", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {r["server"]: r for r in result["stores"]}
    assert set(rows) == {"calmline", "calmline-pg", "calmline-pg-x2"}
    for row in rows.values():
        assert row["errors"] == 0 and row["sessions"] == 40 and row["audit_steps"] == 40
        # Commits were seen by the database and grouped no worse than one per event.
        assert 0 < row["db_commits"] <= row["audit_events"]
        assert row["step_commit_p99_ms"] > 0
    for name in ("calmline-pg", "calmline-pg-x2"):
        final = result["finals"][name]
        assert final["steps"] == final["expected_steps"] > 0
        assert final["xact_commit"] >= final["commits"] > 0
    assert result["memory"]["calmline-pg-x2"]["processes"] == 2
    assert "ratio: two instances / one on PostgreSQL" in done.stdout
    # The benchmark drops the databases it created.
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        left = conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'calmline_bench_%'").fetchone()[0]
    assert left == 0
