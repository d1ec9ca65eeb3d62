"""The console in a real browser (Playwright driving Debian's Chromium), served by a real
`calmline console` beside a real `calmline serve`, on one store; the fake Asterisk plays a
final warning through the service while a supervisor watches the live page."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fake_asterisk import bridged_caller, environment as agi_environment, run_session
from serve_process import ServeProcess, environment
from stores import sqlite_db
from trails import END_STEPS, Trail, transferred, warned

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
PASSWORD = "correct horse battery"
HOSTILE = "<img src=x onerror=alert(1)>\u202eevil"
SHOTS = os.environ.get("CALMLINE_CONSOLE_SHOTS")  # a folder: also save the README's screenshots there


@pytest.fixture
def playwright_browser():
    if CHROMIUM is None:
        message = "no chromium: `apt-get install -y chromium` to drive the console in a real browser"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def seed(db_path: Path) -> None:
    now = datetime.now(timezone.utc)
    t = Trail(sqlite_db(db_path))
    for i in range(12):
        at = now - timedelta(days=i % 6, hours=2 + i)
        agent = ["PJSIP/alice-0000002a", "PJSIP/bob-0000002b"][i % 2]
        number = ["+4930111", "+4930222", "+4930333"][i % 3]
        name = HOSTILE if i == 0 else ["Ann Example", "Bo Jones", ""][i % 3]
        t.session(at, "warn", linkedid=f"S.{i}", agent=agent, number=number, name=name, steps=[warned(1)])
        if i % 3 == 0:
            t.session(at + timedelta(minutes=1), "warn", linkedid=f"S.{i}", agent=agent, number=number, name=name,
                      steps=[warned(2, final=True)])
        if i % 4 == 1:
            t.session(at + timedelta(minutes=2), "transfer/supervisor", linkedid=f"S.{i}", agent=agent,
                      number=number, name=name, steps=transferred("supervisor"))
        if i % 5 == 2:
            t.session(at + timedelta(minutes=3), "end", linkedid=f"S.{i}", agent=agent, number=number, name=name,
                      steps=END_STEPS)
    t.event(now - timedelta(days=3), "service_started", fingerprint="1111aaaa")
    t.event(now - timedelta(days=2), "config_reloaded", fingerprint="2222bbbb")
    t.close()


def calmline(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calmline", "-c", str(config), *args], input=stdin,
                          capture_output=True, text=True, env=environment(), timeout=60)


def test_a_supervisor_logs_in_filters_opens_a_call_downloads_the_csv_and_watches_live(tmp_path, playwright_browser):
    store = tmp_path / "calmline.sqlite3"
    seed(store)
    config = tmp_path / "calmline.toml"
    config.write_text(f'[server]\nport = 0\n[store]\nurl = "sqlite:///{store}"\n[mail]\nport = 1\n'
                      f'[console]\nport = 0\ntimezone = "Europe/Berlin"\nsecret_file = "{tmp_path / "console.key"}"\n')
    added = calmline(config, "console", "add-user", "alice", "--password-stdin", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    with ServeProcess(config, cwd=tmp_path) as service, \
            ServeProcess(argv=[sys.executable, "-m", "calmline", "-c", str(config), "console"], cwd=tmp_path) as console:
        line = console.wait_for_stderr("listening on http://", timeout=30)
        base = line.split("listening on ", 1)[1].split()[0].rstrip("/")
        context = playwright_browser.new_context(accept_downloads=True, viewport={"width": 1360, "height": 900})
        page = context.new_page()
        dialogs, violations = [], []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)

        # Logged out: any page sends the browser to the login form.
        page.goto(base + "/calls?kind=final_warning")
        assert "/login" in page.url
        page.fill("#username", "alice")
        page.fill("#password", "not the password")
        page.click("button[type=submit]")
        assert page.locator(".error").inner_text().startswith("Wrong name or password")
        page.fill("#username", "alice")
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url("**/calls?kind=final_warning")
        assert page.locator("#calls tbody tr").count() == 4  # S.0, S.3, S.6, S.9
        if SHOTS:
            page.goto(base + "/calls?since=")
            page.screenshot(path=str(Path(SHOTS) / "console-calls.png"), full_page=False)

        # Filter with the form: one agent's calls with a transfer.
        page.goto(base + "/calls?since=")
        assert page.locator("#calls tbody tr").count() == 12
        page.fill("input[name=agent]", "PJSIP/bob")
        page.select_option("select[name=kind]", "transfer")
        page.click("form.filters button[type=submit]")
        page.wait_for_url("**kind=transfer**")
        rows = page.locator("#calls tbody tr")
        assert rows.count() == 3  # S.1, S.5, S.9
        assert "agent=PJSIP%2Fbob" in page.url  # the filters are in the link, to share

        # The hostile name is shown as text, and nothing ran.
        page.goto(base + "/calls?since=&caller=evil")
        assert page.locator("#calls tbody tr").count() == 1
        shown = page.locator("#calls tbody tr bdi").nth(1).inner_text()
        assert shown == "<img src=x onerror=alert(1)>\\u202eevil"

        # Open a call: every leg, the same caller's other calls.
        page.click("#calls tbody tr a")
        page.wait_for_url("**/calls/S.0")
        assert page.locator(".leg").count() == 2
        assert page.locator("#caller-name").inner_text() == "<img src=x onerror=alert(1)>\\u202eevil"
        assert page.locator("#others li").count() == 3  # S.3, S.6, S.9 share +4930111
        if SHOTS:
            page.goto(base + "/calls/S.9")
            page.screenshot(path=str(Path(SHOTS) / "console-call.png"), full_page=True)
            page.goto(base + "/trends?since=" + (datetime.now() - timedelta(days=8)).date().isoformat())
            page.screenshot(path=str(Path(SHOTS) / "console-trends.png"), full_page=True)

        # Download the CSV of a filtered list: exactly its rows.
        page.goto(base + "/calls?since=&agent=PJSIP/alice")
        listed = page.locator("#calls tbody tr").count()
        with page.expect_download() as info:
            page.click("#csv")
        download = info.value
        assert download.suggested_filename.startswith("calmline-calls-")
        rows = list(csv.DictReader(io.StringIO(Path(download.path()).read_text(encoding="utf-8"))))
        assert len(rows) == listed == 6
        assert {r["agents"] for r in rows} == {"PJSIP/alice"}

        # Live: the fake Asterisk plays the final warning through the real service.
        page.goto(base + "/live")
        page.wait_for_function("document.getElementById('status').textContent === 'connected'", timeout=10000)
        before = page.locator("#live tbody tr").count()
        channel = bridged_caller()
        channel.variables["CALMLINE_WARNINGS"] = "1"  # one warning given: this press plays the final one
        channel.functions["CHANNEL(linkedid)"] = "LIVE.1"
        played = time.monotonic()
        port = service.port
        with ThreadPoolExecutor(1) as pool:  # Playwright's loop holds this thread
            pool.submit(asyncio.run, run_session(port, channel, agi_environment(port=port))).result(30)
        service.wait_for("step", step="warning_played")
        row = page.locator("#live tbody tr[data-kind=final_warning]")
        row.wait_for(timeout=2000)  # within 2 s of the step being committed
        seen = time.monotonic() - played
        assert page.locator("#live tbody tr").count() == before + 1
        assert "final warning" in row.inner_text()
        assert row.locator("a").get_attribute("href") == "/calls/LIVE.1"
        if SHOTS:
            page.screenshot(path=str(Path(SHOTS) / "console-live.png"))
        print(f"final warning on the live page {seen:.2f}s after the session began")

        # Log out: the pages are closed again.
        page.click("header .who button")
        page.wait_for_url("**/login")
        page.goto(base + "/calls")
        assert "/login" in page.url
        assert dialogs == [] and violations == []
        context.close()
    viewed = calmline(config, "audit", "--limit", "500").stdout
    assert '"event": "console_call_viewed"' in viewed and '"linkedid": "S.0"' in viewed
    assert '"event": "console_login_failed"' in viewed and '"event": "console_login"' in viewed
