"""The live view at ``/`` in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

Serves the bundled model as ``lopa serve`` does and checks the page against the API of the same server (never
against the model's exact text): the grid's text equals ``/v1/completions``' text for the same settings, one
step per forward, every filled cell's forward, token and lookahead mark equal the ``/v1/trace`` stream's; compare
mode shows both runs; a 4xx's message, an unreachable server and a stream that breaks off are shown; everything
works from the keyboard.
Skips when Playwright or the browser is missing (``.ci/run`` installs both). A screenshot of compare mode is
saved in the test's tmp dir, and also in ``$LOPA_SCREENSHOT_DIR`` when set (docs/live-view.png comes from there).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install 'lopa[dev]')")

CHROMIUM = os.environ.get("LOPA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium found (apt-get install chromium, or set LOPA_CHROMIUM)", allow_module_level=True)

from lopa import LLM  # noqa: E402
from lopa.server import create_app  # noqa: E402
from lopa.server.background import serve_in_background  # noqa: E402

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PROMPT = "Q: Kim has 48 eggs. She buys 3 more. She then eats 2. She finds 4 more. How many eggs does Kim have now? A:"
# the bundled model's recommended settings: its answers can be worded many ways, so the threshold decoder is slow
LOPA = {"decoder": "lopa", "base": "threshold", "branches": 4, "threshold": 0.9, "block_size": 32, "max_new_tokens": 64}
BASE = {**LOPA, "decoder": "threshold"}
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()  # the bundled model, as `lopa serve` loads it


@pytest.fixture(scope="module")
def base_url(llm: LLM):
    with serve_in_background(create_app(llm, default_config=llm.default_config)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, base_url: str):
    p = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.goto(f"{base_url}/")
    p.wait_for_selector("body[data-ready='1']", timeout=WAIT_MS)
    if p.is_enabled("#chat"):
        p.uncheck("#chat")  # the API side of every comparison is /v1/completions with the raw prompt
    yield p
    p.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def set_settings(page, run: str, settings: dict) -> None:
    for name, value in settings.items():
        if name in ("decoder", "base"):
            page.select_option(f"#{run}-{name}", value)
        else:
            page.fill(f"#{run}-{name}", str(value))


def wait_done(page, runs: str = "a") -> None:
    for r in runs:  # CSS selectors, not a JavaScript predicate: the page's CSP forbids evaluating strings
        page.wait_for_selector(f"#run-{r}[data-state='done']", state="attached", timeout=WAIT_MS)


def api(base_url: str, settings: dict) -> dict:
    r = httpx.post(f"{base_url}/v1/completions", json={"prompt": PROMPT, "lopa": settings}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def trace_fills(base_url: str, settings: dict) -> tuple[dict[int, tuple[int, int, bool]], list[dict]]:
    """position -> (forward, token, lookahead), and the step events, from the /v1/trace stream."""
    fills, steps = {}, []
    with httpx.stream("POST", f"{base_url}/v1/trace", json={"prompt": PROMPT, "lopa": settings}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                if "forward" in event:
                    steps.append(event)
                    for f in event["filled"]:
                        fills[f["position"]] = (event["forward"], f["token"], f["lookahead"])
    return fills, steps


def cells(page, run: str) -> list[dict]:
    return page.eval_on_selector_all(
        f"#run-{run} .cell",
        """cs => cs.map(c => ({pos: +c.dataset.pos, step: c.dataset.step ? +c.dataset.step : null,
            token: c.dataset.token ? +c.dataset.token : null, lookahead: c.classList.contains('lookahead'),
            piece: c.dataset.piece ?? '', background: c.style.background}))""",
    )


def check_run(page, base_url: str, run: str, settings: dict) -> dict:
    """The panel of ``run`` agrees with the API and the trace stream for ``settings``; returns the API answer."""
    want = api(base_url, settings)
    forwards = want["usage"]["forwards"]
    grid = cells(page, run)
    assert "".join(c["piece"] for c in grid) == want["choices"][0]["text"]
    assert page.locator(f"#run-{run} .steps > li").count() == forwards
    assert page.inner_text(f"#run-{run} [data-counter=forwards]") == str(forwards)
    assert page.inner_text(f"#run-{run} [data-counter=tpf]") == f"{want['usage']['tokens_per_forward']:.2f}"
    fills, steps = trace_fills(base_url, settings)
    assert len(steps) == forwards
    assert len(grid) == settings["max_new_tokens"]
    for c in grid:
        if c["pos"] in fills:
            assert (c["step"], c["token"], c["lookahead"]) == fills[c["pos"]], f"cell {c['pos']}"
        else:
            assert c["step"] is None
    colours: dict[int, set[str]] = {}
    for c in grid:
        if c["step"] is not None:
            colours.setdefault(c["step"], set()).add(c["background"])
    assert all(len(v) == 1 for v in colours.values()), "one colour per forward"
    assert len({next(iter(v)) for v in colours.values()}) == len(colours), "each forward its own colour"
    winners = page.eval_on_selector_all(
        f"#run-{run} .steps > li",
        "lis => lis.map(li => [...li.querySelectorAll('tbody tr')].map(tr => tr.classList.contains('winner')))",
    )
    assert [row.index(True) for row in winners] == [s["winner"] for s in steps]
    assert [len(row) for row in winners] == [len(s["candidates"]) for s in steps]
    return want


def test_lopa_run_matches_the_api_and_the_trace(page, base_url: str) -> None:
    set_settings(page, "a", LOPA)
    page.click("#run")
    wait_done(page)
    check_run(page, base_url, "a", LOPA)
    assert page.is_hidden("#run-b") and page.is_hidden("#error")


def test_compare_mode_shows_both_runs(page, base_url: str, tmp_path: Path) -> None:
    page.check("#compare")
    set_settings(page, "a", BASE)
    set_settings(page, "b", LOPA)
    page.click("#run")
    wait_done(page, "ab")
    a, b = check_run(page, base_url, "a", BASE), check_run(page, base_url, "b", LOPA)
    summary = page.inner_text("#summary")
    assert page.is_visible("#summary") and page.is_visible("#run-a") and page.is_visible("#run-b")
    if a["usage"]["forwards"] == b["usage"]["forwards"]:
        assert str(a["usage"]["forwards"]) in summary
    else:
        assert f"({a['usage']['forwards']} vs {b['usage']['forwards']})" in summary
    shot = tmp_path / "live-view.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    if os.environ.get("LOPA_SCREENSHOT_DIR"):
        out = Path(os.environ["LOPA_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / "live-view.png")


def test_bad_settings_show_the_servers_message(page, base_url: str) -> None:
    bad = {**LOPA, "block_size": 5}
    set_settings(page, "a", bad)
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
    r = httpx.post(f"{base_url}/v1/trace", json={"prompt": PROMPT, "lopa": bad}, timeout=60)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert message in page.inner_text("#error") and "(400)" in page.inner_text("#error")
    assert page.get_attribute("#run-a", "data-state") == "error"
    assert not page.is_disabled("#run")  # the user can fix the settings and run again
    page.fill("#a-block_size", "32")
    page.click("#run")
    wait_done(page)
    assert page.is_hidden("#error")


def test_server_gone_is_a_clear_message(browser, llm: LLM) -> None:
    p = browser.new_page()
    with serve_in_background(create_app(llm, default_config=llm.default_config)) as url:
        p.goto(f"{url}/")
        p.wait_for_selector("body[data-ready='1']", timeout=WAIT_MS)
    p.click("#run")  # the server is gone now
    p.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
    text = p.inner_text("#error")
    assert "Cannot reach the lopa server" in text and "lopa serve" in text
    assert p.get_attribute("#run-a", "data-state") == "error"
    p.close()


def test_a_stream_that_breaks_off_is_reported(page, base_url: str) -> None:
    with httpx.stream("POST", f"{base_url}/v1/trace", json={"prompt": PROMPT, "lopa": LOPA}, timeout=120) as r:
        frames = r.read().decode().split("\n\n")
    cut = "\n\n".join(frames[:2]) + "\n\n"  # start and the first step, then the connection ends
    page.route("**/v1/trace", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=cut))
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
    assert "closed before run A finished" in page.inner_text("#error")
    assert page.locator("#run-a .steps > li").count() == 1  # what did arrive is still shown
    assert page.locator("#run-a .cell[data-step='1']").count() >= 1


def focus(page, element_id: str, key: str = "Tab", limit: int = 40) -> None:
    """Press ``key`` until the element with ``element_id`` has the focus."""
    for _ in range(limit):
        if page.evaluate("document.activeElement && document.activeElement.id") == element_id:
            return
        page.keyboard.press(key)
    raise AssertionError(f"#{element_id} never got the keyboard focus")


def test_keyboard_only(page, base_url: str) -> None:
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "prompt"  # the first stop is the prompt
    page.keyboard.press("Control+A")
    page.keyboard.type(PROMPT)
    focus(page, "compare")
    page.keyboard.press("Space")
    assert page.is_checked("#compare") and page.is_visible("#settings-b")
    for run, settings in (("a", BASE), ("b", LOPA)):
        for name in ("decoder", "base"):
            focus(page, f"{run}-{name}")
            page.keyboard.type(settings[name])  # a focused select picks the option typed
        for name in ("threshold", "branches"):
            focus(page, f"{run}-{name}")
            page.keyboard.press("Control+A")
            page.keyboard.type(str(settings[name]))
    focus(page, "run")
    page.keyboard.press("Enter")
    wait_done(page, "ab")
    check_run(page, base_url, "a", BASE)
    check_run(page, base_url, "b", LOPA)
    # a step in the list takes the focus and lights up its cells
    page.evaluate("document.querySelector('#run-a .replay').focus()")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.dataset.forward") == "1"
    lit = page.eval_on_selector_all("#run-a .cell.highlight", "cs => cs.map(c => +c.dataset.step)")
    assert lit and set(lit) == {1}
    # Ctrl+Enter in the prompt runs again
    runs = page.get_attribute("#run-b", "data-runs")
    focus(page, "prompt", key="Shift+Tab", limit=80)
    page.keyboard.press("Control+Enter")
    page.wait_for_selector(f"#run-b[data-runs='{int(runs) + 1}']", state="attached", timeout=WAIT_MS)
    wait_done(page, "ab")
    check_run(page, base_url, "b", LOPA)
