"""The console's pages with a million usage rows, in Chromium: from a click to the page drawn
(bench/README.md, "The console with a million usage rows"). Exits 1 when a page's median
passes 1 s (issue 16's target).

    .venv/bin/python bench/console.py                  # 1,000,000 usage rows, 5 runs a page
    .venv/bin/python bench/console.py --rows 100000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from lib import say, table
from store_usage import CLIENTS, fill, records

from proxy.app import create_app
from proxy.config import parse_config
from proxy.server import BackgroundServer
from proxy.store.sqlite import SQLiteStore

ADMIN = "adm-bench-console-0123456789"
TARGET_MS = 1000.0
PAGES = {  # page -> (its tab, what is on it once drawn)
    "usage": ("", "#usage-table tr"), "budgets": ("budgets", "#budget-bars > *"), "keys": ("keys", "#keys-table tr"),
    "tasks": ("tasks", "#task-counts > *"), "live": ("live", "#live-rate svg"),
}


async def seed(path: Path, rows: int) -> float:
    store = SQLiteStore(str(path))
    try:
        return await fill(store, records(rows, time.time()))
    finally:
        await store.close()


def api_calls(url: str) -> list[list[str]]:
    """The admin API calls behind the pages, each timed once (cold)."""
    today, month_ago = (time.strftime("%Y-%m-%d", time.gmtime(time.time() - d * 86400)) for d in (0, 30))
    rows = []
    for path in (f"/admin/usage?group_by=day&split_by=client&since={month_ago}&until={today}",
                 "/admin/usage?group_by=model", "/admin/budgets", "/admin/keys", "/admin/tasks"):
        started = time.perf_counter()
        reply = httpx.get(url + path, headers={"authorization": f"Bearer {ADMIN}"}, timeout=60)
        rows.append([path, str(reply.status_code), f"{(time.perf_counter() - started) * 1000:.0f} ms"])
    return rows


def pages(url: str, runs: int, chromium: str) -> dict[str, list[float]]:
    from playwright.sync_api import sync_playwright

    times: dict[str, list[float]] = {page: [] for page in PAGES}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        for _ in range(runs):
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            for name, (tab, drawn) in PAGES.items():
                started = time.perf_counter()
                if tab:
                    page.click(f"a[data-page={tab}]")
                else:  # usage: open the console and sign in
                    page.goto(url + "/console")
                    page.fill("#admin-key", ADMIN)
                    page.click("#sign-in-form button[type=submit]")
                page.wait_for_selector(drawn)  # visible: its section is shown and filled
                times[name].append((time.perf_counter() - started) * 1000)
            page.close()
        browser.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="usage rows in the store (default 1,000,000)")
    parser.add_argument("--runs", type=int, default=5, help="times each page is opened (default 5)")
    args = parser.parse_args()
    if (chromium := shutil.which("chromium")) is None:
        say("no chromium on this machine: apt-get install chromium")
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-console-") as folder:
        path = Path(folder) / "usage.sqlite3"
        say(f"seeding {args.rows:,} usage rows …")
        say(f"  {asyncio.run(seed(path, args.rows)):,.0f} records/s through add_usage")
        server = BackgroundServer(create_app(parse_config({
            "clients": [{"name": name, "key": f"sk-bench-{name}-0123456789", "budget": 100_000,
                         "budget_period": "monthly"} for name in CLIENTS],
            "providers": {"xffuw": {"base_url": "http://127.0.0.1:9/api/v1/", "keys": ["xf_bench_console_key_1"]}},
            "admin": {"keys": [ADMIN]}, "storage": {"path": str(path)}, "log": {"level": "warning"}}))).start()
        try:
            say("admin API behind the pages (first call, cold):")
            for line in table(["call", "status", "time"], api_calls(server.url)):
                say("  " + line)
            times = pages(server.url, args.runs, chromium)
        finally:
            server.stop()
    medians = {name: statistics.median(values) for name, values in times.items()}
    say(f"each page in Chromium, {args.runs} runs (usage: sign-in to chart and table drawn; "
        "others: tab click to drawn):")
    for line in table(["page", "median", "worst", f"≤ {TARGET_MS:.0f} ms"], (
            [name, f"{medians[name]:.0f} ms", f"{max(values):.0f} ms",
             "met" if medians[name] <= TARGET_MS else "NOT MET"] for name, values in times.items())):
        say("  " + line)
    return 1 if max(medians.values()) > TARGET_MS else 0


if __name__ == "__main__":
    raise SystemExit(main())
