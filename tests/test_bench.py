"""The benchmark script runs from a checkout and measures what it says it measures.

Not a speed test: it checks that every session completed, that calmline's audit trail got
one step per session, and that the servers really ran with the malloc settings the header
claims (a setting applied after the servers start would silently measure the peers in
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
        [sys.executable, str(SCRIPT), "--servers", "calmline,bare-asyncio", "--concurrency", "1,5",
         "--sessions", "40", "--repeat", "1", "--json", str(out), *extra],
        cwd=tmp_path, env=env_clean, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


@pytest.mark.parametrize("as_is", [False, True])
def test_bench_completes_every_session_with_the_malloc_it_reports(tmp_path, as_is):
    result, stdout = run_bench(tmp_path, *(["--malloc-as-is"] if as_is else []))
    rows = {(r["server"], r["concurrency"]): r for r in result["results"]}
    assert set(rows) == {(s, c) for s in ("calmline", "bare-asyncio") for c in (1, 5)}
    for row in rows.values():
        assert row["errors"] == 0 and row["sessions"] == 40
    for conc in (1, 5):
        assert rows[("calmline", conc)]["audit_steps"] == 40
    final = result["calmline_final"]
    assert final["steps"] == final["expected_steps"] > 0
    seen = result["server_malloc_seen"]
    expected = {k: None for k in PINNED} if as_is else PINNED
    assert seen == {"calmline": expected, "bare-asyncio": expected}
    assert ("dynamic thresholds" in stdout) is as_is
    assert "ratio: calmline/bare first-cmd p50 @1" in stdout
