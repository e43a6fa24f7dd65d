"""The web console (issue 16) in a real browser: Debian's chromium driven by Playwright, against the
simulated upstreams with real traffic made first. No browser is downloaded: without chromium the
tests skip, unless CI=true, where a session fixture installs it from the Debian archive.

Screenshots of every page (a laptop and a phone) are taken in a test; with UPDATE_SCREENSHOTS=1
they replace the ones in docs/console/ that the README shows."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import os
import re
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import OTHER_CLIENT_KEY, XFFUW_KEYS, RunningProxy, Sims
from helpers import (
    ADMIN,
    ADMIN_KEY,
    AUTH,
    BOB,
    ROOT,
    admin_get,
    calls_by_key,
    chat,
    in_background,
    post_image,
    wait_until,
    with_admin,
)

from proxy.pool import fingerprint
from proxy.store import UsageRecord
from proxy.store.sqlite import SQLiteStore

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

K0, K1 = XFFUW_KEYS
PAGES = ("usage", "budgets", "keys", "tasks", "live")
LAPTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
SHOTS = ROOT / "docs" / "console"
WAIT_MS = 10_000


def _chromium() -> str | None:
    """The system chromium; under CI=true installed from the Debian archive when missing."""
    found = shutil.which("chromium")
    if found or os.environ.get("CI") != "true":
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run([*sudo, *command], capture_output=True, text=True, env=env, timeout=1200, check=False)
        assert done.returncode == 0, f"{' '.join(command)} failed: {done.stderr[-2000:]}"
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium but it is not on PATH"
    return found


@pytest.fixture(scope="module")  # not the session: Playwright's event loop runs in this thread while it lasts
def browser() -> Iterator[Any]:
    path = _chromium()
    if path is None:
        pytest.skip("no chromium on this machine (apt-get install chromium; CI=true installs it)")
    expect.set_options(timeout=WAIT_MS)
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=LAPTOP, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


@pytest.fixture
def console_config(proxy_config: dict[str, Any], sims: Sims) -> dict[str, Any]:
    proxy_config["clients"][0].update(budget=4.0, budget_period="monthly")  # traffic() spends 3.5 of it
    sims.xffuw.task_seconds = sims.fengyuan.task_seconds = 0.05
    proxy_config["tasks"] = {"poll_interval": 0.1, "first_poll": 0.05, "timeout": 20}
    return with_admin(proxy_config)


@pytest.fixture
def console(start_proxy: Callable[[dict[str, Any]], RunningProxy], console_config: dict[str, Any]) -> RunningProxy:
    return start_proxy(console_config)


def earlier_usage(path: str, days: int = 29) -> None:
    """Usage of the days before today, written through the store itself (as a proxy running then
    would have): bob and a build bot on several models, none of it in alice's budget."""
    async def write() -> None:
        store = SQLiteStore(path)
        today = time.time() // 86400 * 86400
        for day in range(1, days + 1):
            for n in range(3 + (day * 7) % 11):
                for client, model, upstream, cost in (("bob", "gpt-4o-mini", "xffuw", 0.5),
                                                      ("ci-bot", "deepseek-chat", "fengyuan", 0.2),
                                                      ("bob", "gpt-image-2", "xffuw", 2.0)):
                    if model == "gpt-image-2" and (n + day) % 4:
                        continue
                    store.add_usage(UsageRecord(at=today - day * 86400 + 3600 + n * 60, client=client, model=model,
                                                upstream=upstream, key="0123456789ab", cost=cost,
                                                outcome="failed" if (n + day) % 13 == 0 else "ok", kind="chat"))
        await store.close()

    writer = threading.Thread(target=asyncio.run, args=(write(),))  # Playwright holds this thread's event loop
    writer.start()
    writer.join(timeout=60)


def traffic(proxy: RunningProxy) -> None:
    """Some of everything: two clients, two models, an image task."""
    for i in range(3):
        chat(proxy.client(), f"alice {i}")
    for i in range(2):
        chat(proxy.client(api_key=OTHER_CLIENT_KEY), f"bob {i}")
    reply = post_image(proxy.url, "a lighthouse at dusk")
    assert reply.status_code == 200, reply.text


def sign_in(page: Any, proxy: RunningProxy, key: str = ADMIN_KEY) -> None:
    if not page.url.endswith("/console"):
        page.goto(proxy.url + "/console")
    page.fill("#admin-key", key)
    page.click("#sign-in-form button[type=submit]")


def open_tab(page: Any, name: str) -> None:
    page.click(f"#tabs a[data-page={name}]")
    expect(page.locator(f"#page-{name}")).to_be_visible()


def test_a_wrong_key_is_refused_and_the_right_one_is_kept_nowhere(console: RunningProxy, page: Any) -> None:
    traffic(console)
    sign_in(page, console, "adm-not-the-admin-key-42")
    expect(page.locator("#sign-in-error")).to_contain_text("Incorrect admin key")
    expect(page.locator("#tabs")).to_be_hidden()
    expect(page.locator("#page-usage")).to_be_hidden()

    sign_in(page, console)
    expect(page.locator("#tabs")).to_be_visible()
    expect(page.locator("#sign-in")).to_be_hidden()
    assert page.input_value("#admin-key") == ""
    for name in PAGES:
        open_tab(page, name)
        expect(page.locator(f"#page-{name} table, #page-{name} .budget, #page-{name} svg").first).to_be_visible()
    shown = [page.content(), page.url, json.dumps(page.evaluate("() => ({...localStorage})")),
             json.dumps(page.evaluate("() => ({...sessionStorage})")), json.dumps(page.context.cookies()),
             page.evaluate("() => document.cookie"), json.dumps(page.evaluate("() => history.length"))]
    for text in shown:
        assert ADMIN_KEY not in text
    assert page.evaluate("() => localStorage.length + sessionStorage.length") == 0

    page.click("#sign-out")  # and gone from the page: signing in again asks for it
    expect(page.locator("#sign-in")).to_be_visible()
    page.reload()
    expect(page.locator("#sign-in")).to_be_visible()
    expect(page.locator("#tabs")).to_be_hidden()


def test_the_usage_chart_and_table_show_the_days_cost_of_the_admin_api(console: RunningProxy, page: Any) -> None:
    traffic(console)
    days = admin_get(console.url, "/admin/usage", group_by="day").json()["data"]
    assert len(days) == 1
    today, cost, requests = days[0]["group"], days[0]["cost"], days[0]["requests"]
    assert cost > 0 and requests == 6

    sign_in(page, console)
    bar = page.locator(f"#usage-chart g.day[data-day='{today}']")
    expect(bar.locator("rect")).to_have_count(2)  # stacked by client: alice and bob
    assert float(bar.get_attribute("data-cost")) == pytest.approx(cost)
    assert int(bar.get_attribute("data-requests")) == requests
    row = page.locator(f"#usage-table tr.day-total[data-day='{today}']")
    assert float(row.locator("td.cost").inner_text()) == pytest.approx(cost)
    assert float(page.locator("#total-cost b").inner_text()) == pytest.approx(cost)
    assert page.locator("#usage-chart g.day").count() == 30  # the last 30 UTC days, today's last

    page.check("input[name=split][value=model]")  # stacked by model now
    expect(page.locator("#usage-legend")).to_contain_text("gpt-image-2")
    expect(bar.locator("rect")).to_have_count(2)
    assert float(bar.get_attribute("data-cost")) == pytest.approx(cost)

    page.select_option("#usage-client", "bob")  # a filter: bob's chats only
    page.click("#usage-filters button[type=submit]")
    bob = admin_get(console.url, "/admin/usage", group_by="day", client="bob").json()["data"][0]
    expect(page.locator("#total-cost b")).to_have_text(str(bob["cost"]).rstrip("0").rstrip("."))
    assert float(bar.get_attribute("data-cost")) == pytest.approx(bob["cost"])

    with page.expect_download() as download:
        page.click("#usage-csv")
    assert download.value.url.startswith("blob:")  # fetched with the key in a header, never in a URL
    rows = list(csv.reader(io.StringIO(Path(download.value.path()).read_text())))
    assert rows[0] == ["day", "model", "requests", "cost", "failed"]
    assert rows[1][:3] == [today, "gpt-4o-mini", "2"] and float(rows[1][3]) == pytest.approx(bob["cost"])

    page.select_option("#usage-client", "")  # every client, one model
    page.fill("#usage-model", "gpt-image-2")
    page.click("#usage-filters button[type=submit]")
    image = admin_get(console.url, "/admin/usage", group_by="day", model="gpt-image-2").json()["data"][0]
    expect(page.locator("#total-requests b")).to_have_text("1")
    assert float(bar.get_attribute("data-cost")) == pytest.approx(image["cost"])

    yesterday = (dt.date.fromisoformat(today) - dt.timedelta(days=1)).isoformat()
    page.fill("#usage-model", "")
    page.fill("#usage-since", yesterday)  # a range of one day, before the traffic
    page.fill("#usage-until", yesterday)
    page.click("#usage-filters button[type=submit]")
    expect(page.locator("#usage-chart g.day")).to_have_count(1)
    expect(page.locator("#total-requests b")).to_have_text("0")
    assert page.locator(f"#usage-chart g.day[data-day='{yesterday}']").get_attribute("data-cost") == "0"


def test_disabling_a_key_with_its_button_sends_the_next_chats_to_the_other(console: RunningProxy, sims: Sims,
                                                                          page: Any) -> None:
    traffic(console)
    sign_in(page, console)
    open_tab(page, "keys")
    row = page.locator(f"#keys-table tr[data-fingerprint='{fingerprint(K0)}']")
    expect(row).to_have_attribute("data-state", "active")
    row.locator("button.disable").click()
    expect(row).to_have_attribute("data-state", "disabled")
    expect(row.locator(".badge")).to_have_text("disabled")
    expect(row).to_contain_text("disabled by an admin")

    start = len(sims.xffuw.calls)
    for i in range(4):
        chat(console.client(api_key=OTHER_CLIENT_KEY), f"after the button {i}")  # bob: no budget
    assert calls_by_key(sims.xffuw, "chat", start) == {K1: 4}

    row.locator("button.enable").click()
    expect(row).to_have_attribute("data-state", "active")
    keys = {k["fingerprint"]: k for k in admin_get(console.url, "/admin/keys").json()["data"]}
    assert keys[fingerprint(K0)]["state"] == "active"


def test_a_running_task_shows_under_tasks_then_moves_to_finished(console: RunningProxy, page: Any) -> None:
    traffic(console)
    sign_in(page, console)
    open_tab(page, "tasks")
    expect(page.locator("#task-counts [data-state=succeeded] b")).to_have_text("1")
    slow, box = in_background(lambda: post_image(console.url, "a slow harbour [delay=2.5]", headers=BOB))

    waiting = page.locator("#tasks-waiting tr[data-task]")
    expect(waiting).to_have_count(1)
    task_id = waiting.get_attribute("data-task")
    expect(waiting).to_contain_text("gpt-image-2")
    expect(page.locator("#task-counts [data-state=running] b, #task-counts [data-state=pending] b")
           .filter(has_text="1")).to_have_count(1)
    finished = page.locator(f"#tasks-finished tr[data-task='{task_id}']")
    expect(finished).to_have_attribute("data-state", "succeeded")
    expect(waiting).to_have_count(0)
    expect(page.locator("#task-counts [data-state=succeeded] b")).to_have_text("2")
    slow.join(timeout=10)
    assert box["result"].status_code == 200 and box["result"].headers["x-proxy-task-ids"] == task_id

    finished.locator("a.task-id").click()  # its detail, linked by id
    expect(page.locator("#task-detail")).to_contain_text(task_id)
    expect(page.locator("#task-detail")).to_contain_text("succeeded")
    assert page.url.endswith(f"#tasks/{task_id}")


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def test_screenshots_of_every_page_on_a_laptop_and_a_phone(start_proxy: Callable[[dict[str, Any]], RunningProxy],
                                                           console_config: dict[str, Any], page: Any,
                                                           tmp_path: Path) -> None:
    earlier_usage(console_config["storage"]["path"])
    console_config["tasks"]["timeout"] = 3  # the slow task's request ends (504) and the task goes on, late
    console = start_proxy(console_config)
    traffic(console)  # alice past 80 % of her budget
    bad = httpx.post(console.url + "/v1/chat/completions", headers=AUTH, json={"model": "no-such-model"}, timeout=10)
    assert bad.status_code >= 400
    assert httpx.post(f"{console.url}/admin/keys/{fingerprint(K1)}/disable", headers=ADMIN, timeout=10).is_success
    post_image(console.url, "a stormy sea [fail]", headers=BOB)
    in_background(lambda: post_image(console.url, "a patient painting [delay=60]", headers=BOB))
    wait_until(lambda: admin_get(console.url, "/admin/tasks").json()["waiting"], what="a waiting task")

    out = SHOTS if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    sign_in(page, console)
    shots = []
    for name in PAGES:
        open_tab(page, name)
        ready = {"usage": "#usage-chart svg", "budgets": ".budget.warn", "keys": "#keys-table .badge.disabled",
                 "tasks": "#tasks-waiting tr[data-task]", "live": "#live-rate svg"}[name]
        expect(page.locator(ready).first).to_be_visible()
        if name == "usage":  # the earlier days are drawn too, each its own bar
            assert page.locator("#usage-chart g.day:has(rect)").count() == 30
        shots.append(out / f"{name}.png")
        page.screenshot(path=shots[-1])
        if name == "budgets":
            expect(page.locator(".budget[data-client=alice] .badge")).to_have_text("over 80 %")
            expect(page.locator(".budget[data-client=bob]")).not_to_have_class(re.compile(r"\bwarn\b"))

    page.set_viewport_size(PHONE)
    for name in ("usage", "keys"):
        open_tab(page, name)
        if name == "usage":  # the chart is drawn again to the phone's width
            page.wait_for_function("() => +document.querySelector('#usage-chart svg').getAttribute('width') < 390")
        # the narrow layout: nothing wider than the phone; wide tables scroll in their own box
        assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"], name
        shots.append(out / f"phone-{name}.png")
        page.screenshot(path=shots[-1])
    for shot in shots:
        width, height = _png_size(shot)
        assert shot.stat().st_size > 10_000, shot
        assert height == (PHONE if shot.name.startswith("phone") else LAPTOP)["height"], shot
        assert width == (PHONE if shot.name.startswith("phone") else LAPTOP)["width"], shot


def test_the_live_page_refreshes_itself_with_new_traffic(console: RunningProxy, page: Any) -> None:
    traffic(console)
    sign_in(page, console)
    open_tab(page, "live")
    expect(page.locator("#live-requests b")).to_have_text("6")  # the chats and the image; not the console's calls
    for i in range(3):
        chat(console.client(api_key=OTHER_CLIENT_KEY), f"while watching {i}")
    bad = httpx.post(console.url + "/v1/images/generations", headers=BOB, json={"model": "gpt-image-2"}, timeout=10)
    assert bad.status_code == 400
    expect(page.locator("#live-requests b")).to_have_text("10")  # no reload: the page asked again
    assert page.locator("#live-rate svg path").count() == 2 and page.locator("#live-errors svg path").count() == 2
    expect(page.locator("#live-error-rate b")).to_have_text("0.0 %")  # a 400 is the client's error, not the proxy's
