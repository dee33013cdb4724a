"""The pack in a real browser: ComfyUI's own frontend in headless Chromium, driven like a user.

ComfyUI runs on loopback with the pack (fixture ``comfy_server`` in conftest.py); Playwright for
Python drives the system Chromium (``$NTI_CHROMIUM``, else ``chromium`` on PATH — Playwright's own
browser downloads are not used). A shipped workflow is loaded from the template browser, prompts
are typed into the Attention Edit Plan node, the token view's marks are read from the page, a
click on a target token is checked in the widget values, and the workflow is queued on the tiny
checkpoint (the test overrides of test_workflows_http.py, set as widget values through
``window.app.graph``) until Null-Text Optimize draws its loss curve.

Screenshots go to each test's tmp dir and, when ``$NTI_BROWSER_ARTIFACTS`` names a folder, there
too. Without ComfyUI, Chromium or playwright every test is skipped, saying which is missing.
Select them with ``pytest -k browser``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import comfy_support
import http_support
import pytest
from test_workflows_http import INNER, SIDE, STEPS, TINY

from nti_core import plan_spec

CHROMIUM_ENV = "NTI_CHROMIUM"
ARTIFACTS_ENV = "NTI_BROWSER_ARTIFACTS"
TEMPLATE = "nti_p2p_real_image_edit"
PLAN, OPTIMIZE = "NTIAttentionEditPlan", "NTINullTextOptimize"
SOURCE = "a cat sitting next to a mirror"
REPLACE = "a tiger sitting next to a mirror"
REFINE = "a cat sitting next to a tall mirror"
VIEWPORT = {"width": 1600, "height": 1400}
WAIT_MS = 60_000
VIEW, CURVE = "nti_token_view", "nti_loss_curve"  # the DOM widgets of the contract
LOSS_EVENT = "nti_photo_edit.loss"  # the server message per optimised step

# Helpers installed in the page once the frontend is up: nodes found by type (one of each in the
# shipped workflow), the canvas centred on a node, its rectangle on the page, the token view read
# into plain data.
PAGE_HELPERS = """() => {
  const node = (type) => app.graph.nodes.find((n) => n.type === type);
  const frame = () => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  const widget = (type, name) => node(type)?.widgets?.find((w) => w.name === name);
  window.ntiTest = {
    node, widget, frame,
    async focus(type, scale) {
      const n = node(type), ds = app.canvas.ds;
      ds.scale = scale;
      ds.offset[0] = 90 / scale - n.pos[0];
      ds.offset[1] = 150 / scale - n.pos[1];
      app.canvas.setDirty(true, true);
      await frame();
    },
    rect(type) {  // the node with its title, in page pixels
      const [x, y, w, h] = node(type).boundingRect, ds = app.canvas.ds;
      const c = app.canvas.canvas.getBoundingClientRect();
      return {x: (x + ds.offset[0]) * ds.scale + c.left - 8, y: (y + ds.offset[1]) * ds.scale + c.top - 8,
              width: w * ds.scale + 16, height: h * ds.scale + 16};
    },
    widgetPoint(type, name) {  // the middle of a canvas-drawn widget, in page pixels
      const n = node(type), w = widget(type, name), ds = app.canvas.ds;
      const c = app.canvas.canvas.getBoundingClientRect();
      return {x: (n.pos[0] + n.size[0] / 2 + ds.offset[0]) * ds.scale + c.left,
              y: (n.pos[1] + w.y + 10 + ds.offset[1]) * ds.scale + c.top};
    },
    clipped(type, name) {  // pixels of the DOM widget hidden behind its scroll bar
      const el = widget(type, name)?.element;
      return el ? el.scrollHeight - el.clientHeight : null;
    },
    async fit(type, name) {  // grow the node until its DOM widget shows all, as a user drags
      const n = node(type), el = widget(type, name)?.element;
      for (let i = 0; el && i < 3 && el.scrollHeight > el.clientHeight + 1; i++) {
        n.setSize([n.size[0], n.size[1] + el.scrollHeight - el.clientHeight + 8]);
        app.canvas.setDirty(true, true);
        await frame();
      }
    },
    view() {
      const el = widget('NTIAttentionEditPlan', 'nti_token_view')?.element;
      const root = el && (el.matches('div.nti-token-view') ? el : el.querySelector('div.nti-token-view'));
      if (!root) return null;
      return {
        editKind: root.getAttribute('data-edit-kind'),
        prompts: [...root.querySelectorAll('div.nti-prompt')].map((p) => ({
          role: p.dataset.role, index: Number(p.dataset.index),
          tokens: [...p.querySelectorAll('span.nti-token')].map((s) => ({
            word: s.dataset.word, mark: s.dataset.mark, pos: Number(s.dataset.pos),
            reweight: s.dataset.reweight ?? null, blend: s.dataset.blend ?? null})),
        })),
        warnings: [...root.querySelectorAll('div.nti-plan-warning')].map((d) => d.textContent.trim()),
        modes: [...(el.querySelector('select.nti-click-mode')?.options ?? [])].map((o) => o.value),
      };
    },
    curve() {
      const el = widget('NTINullTextOptimize', 'nti_loss_curve')?.element;
      const c = el && (el.matches('canvas.nti-loss-curve') ? el : el.querySelector('canvas.nti-loss-curve'));
      return c ? {steps: Number(c.dataset.steps), total: Number(c.dataset.total),
                  width: c.width, height: c.height} : null;
    },
  };
}"""

# The words of each prompt in the view, one entry per word (a word's tokens share data-word).
VIEW_WORDS = """() => {
  const v = window.ntiTest.view();
  if (!v) return null;
  return v.prompts.map((p) => p.tokens.map((t) => t.word).filter((w) => w)
    .filter((w, i, all) => i === 0 || w !== all[i - 1]).join(' '));
}"""


class BrowserSkipWarning(UserWarning):
    """The browser tests did not run: shown in the warnings summary as well as the skip list."""


def skip_loudly(reason: str) -> None:
    warnings.warn(reason, BrowserSkipWarning, stacklevel=2)
    pytest.skip(reason)


def chromium_path() -> tuple[str | None, str]:
    """(the Chromium executable, or None) and where it was looked for."""
    named = os.environ.get(CHROMIUM_ENV, "").strip()
    if named:
        return (named if Path(named).is_file() else None), f"${CHROMIUM_ENV}={named}"
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found, f"chromium on PATH (or set ${CHROMIUM_ENV})"


def keep_artifact(path: Path) -> None:
    """Copy a screenshot to $NTI_BROWSER_ARTIFACTS when set, and print where it is."""
    print(f"screenshot: {path}")
    folder = os.environ.get(ARTIFACTS_ENV, "").strip()
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        copy = Path(folder) / path.name
        shutil.copyfile(path, copy)
        print(f"screenshot: {copy}")


class Editor:
    """One page of the frontend, with the shipped workflow loaded and the console recorded."""

    def __init__(self, page: Any, server: http_support.ComfyServer) -> None:
        self.page = page
        self.server = server
        self.console: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.console.append(m.text))
        page.on("pageerror", lambda e: self.console.append(f"page error: {e}"))

    def problems(self) -> str:
        errors = "\n".join(self.console[-20:]) or "(none)"
        return f"\n--- browser console errors ---\n{errors}" + self.server.log_tail(20)

    def wait(self, script: str, arg: Any = None, what: str = "") -> Any:
        """page.wait_for_function, failing with the console errors and the server log."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            return self.page.wait_for_function(script, arg=arg, timeout=WAIT_MS).json_value()
        except PlaywrightTimeout:
            pytest.fail(f"timed out waiting for {what or script}" + self.problems())

    def js(self, script: str, arg: Any = None) -> Any:
        return self.page.evaluate(script, arg)

    def widget_value(self, node_type: str, name: str) -> Any:
        return self.js("([t, n]) => ntiTest.widget(t, n).value", [node_type, name])

    def set_widgets(self, values: dict[tuple[str, str], Any]) -> None:
        """Set widget values as a script would: value, then the widget's own callback."""
        self.js("""(values) => { for (const [t, n, v] of values) {
                     const w = ntiTest.widget(t, n); w.value = v; w.callback?.(v); } }""",
                [[t, n, v] for (t, n), v in values.items()])

    def dismiss_dialogs(self) -> None:
        """Close what the frontend pops up on load (the missing-models list) with Escape."""
        for _ in range(3):
            if not self.page.locator(".p-dialog").count():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(300)

    def load_template(self) -> None:
        """Open the template browser, pick the pack's category, click the workflow's card."""
        page = self.page
        page.goto(self.server.url + "/")
        self.wait("() => window.app?.graph && document.querySelector('.templates-tab-button')",
                  what="the frontend to start")
        page.wait_for_timeout(1000)  # a first visit opens the browser by itself
        dialog = page.locator("[data-testid=template-workflows-content]")
        if not dialog.count():
            page.click(".templates-tab-button")
        dialog.get_by_role("option", name=http_support.PACK_NAME, exact=True).click()
        dialog.locator(f"[data-testid=template-workflow-{TEMPLATE}]").click()
        dialog.wait_for(state="detached")
        self.wait(f"() => app.graph.nodes.some((n) => n.type === '{PLAN}')",
                  what="the template's graph")
        self.js(PAGE_HELPERS)
        self.dismiss_dialogs()

    def type_prompt(self, name: str, text: str) -> None:
        """Click the plan's text area, select all, type ``text`` on the keyboard."""
        element = self.page.evaluate_handle(f"() => ntiTest.widget('{PLAN}', '{name}').element")
        element.as_element().click()
        self.page.keyboard.press("ControlOrMeta+a")
        self.page.keyboard.type(text)

    def type_text_widget(self, name: str, text: str) -> None:
        """Click a one-line canvas widget of the plan; type into the prompt it opens."""
        self.js(f"() => ntiTest.focus('{PLAN}', 1.1)")
        point = self.js(f"() => ntiTest.widgetPoint('{PLAN}', '{name}')")
        self.page.mouse.move(point["x"], point["y"])
        self.page.mouse.down()
        self.page.mouse.up()
        field = self.page.locator(".graphdialog input")
        field.fill(text)
        field.press("Enter")

    def view_for(self, *prompts: str) -> dict[str, Any]:
        """The token view once it shows exactly these prompts (source, then targets)."""
        self.wait(f"(want) => JSON.stringify(({VIEW_WORDS})()) === JSON.stringify(want)",
                  list(prompts), f"the token view of {prompts}")
        return self.js("() => ntiTest.view()")

    def screenshot(self, node_type: str, scale: float, fit: str, path: Path) -> Path:
        """The node alone, legible at ``scale``; ``fit``: a DOM widget the node grows to show."""
        if fit:
            self.js("([t, w]) => ntiTest.fit(t, w)", [node_type, fit])
        self.js("([t, s]) => ntiTest.focus(t, s)", [node_type, scale])
        self.page.mouse.move(VIEWPORT["width"] - 20, VIEWPORT["height"] // 3)  # no tooltip
        self.page.wait_for_timeout(300)
        self.page.screenshot(path=str(path), clip=self.js("(t) => ntiTest.rect(t)", node_type))
        keep_artifact(path)
        return path


def marks(view: dict[str, Any], role: str, index: int = 0) -> list[tuple[str, str]]:
    (prompt,) = [p for p in view["prompts"] if p["role"] == role and p["index"] == index]
    return [(t["word"], t["mark"]) for t in prompt["tokens"] if t["word"]]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def chromium() -> str:
    """The Chromium executable; skips, naming everything missing, before ComfyUI starts."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -r requirements-dev.txt)")
    path, looked = chromium_path()
    if path is None:
        missing.append(f"Chromium ({looked})")
    if comfy_support.comfy_path() is None:
        missing.append(f"ComfyUI (${comfy_support.COMFYUI_ENV} is unset)")
    if missing:
        skip_loudly("browser tests skipped: no " + "; no ".join(missing))
    return path


@pytest.fixture(scope="module")
def editor(chromium: str, request: pytest.FixtureRequest):
    """The frontend in headless Chromium with the shipped workflow loaded from the template
    browser; one page for the module. ComfyUI starts only once ``chromium`` found all three."""
    from playwright.sync_api import sync_playwright

    comfy_server = request.getfixturevalue("comfy_server")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(WAIT_MS)
            ed = Editor(page, comfy_server)
            ed.load_template()
            yield ed
        finally:
            browser.close()


@pytest.fixture(scope="module")
def finished_run(editor: Editor) -> dict[str, Any]:
    """The workflow queued with the Run button on the tiny checkpoint, until it finished: its
    /history entry and the loss messages the page received."""
    editor.set_widgets({
        ("CheckpointLoaderSimple", "ckpt_name"): TINY,
        ("ImageScale", "width"): SIDE, ("ImageScale", "height"): SIDE,
        ("NTIDDIMInvert", "steps"): STEPS, (OPTIMIZE, "inner_steps"): INNER,
        (PLAN, "source_prompt"): SOURCE, (PLAN, "target_prompts"): REPLACE,
        (PLAN, "reweight"): "tiger:2", (PLAN, "blend_words"): "",
    })
    editor.js(f"""() => {{ window.ntiLossMessages = [];
        app.api.addEventListener('{LOSS_EVENT}', (e) => ntiLossMessages.push(e.detail)); }}""")
    page = editor.page
    with page.expect_response(lambda r: r.url.endswith("/prompt")
                              and r.request.method == "POST") as reply:
        page.get_by_role("button", name="Run", exact=True).click()
    body = reply.value.json()
    assert reply.value.status == 200, f"/prompt refused the run: {body}" + editor.problems()
    entry = editor.server.wait_history(body["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "success", (
        http_support.execution_error(entry) + editor.problems())
    messages = editor.wait(f"() => ntiLossMessages.length >= {STEPS} && ntiLossMessages",
                           what=f"{STEPS} '{LOSS_EVENT}' messages")
    return {"history": entry, "messages": messages}


# --------------------------------------------------------------------------- tests


def test_browser_loads_the_shipped_workflow_from_the_template_browser(editor: Editor) -> None:
    shipped_file = http_support.REPO_ROOT / "workflows" / f"{TEMPLATE}.json"
    shipped = {n["type"] for n in json.loads(shipped_file.read_text())["nodes"]}
    on_page = set(editor.js("() => app.graph.nodes.map((n) => n.type)"))
    assert on_page == shipped
    assert editor.widget_value("NTIDDIMInvert", "source_prompt") == SOURCE


def test_browser_token_view_marks_a_replace(editor: Editor, tmp_path: Path) -> None:
    editor.type_prompt("source_prompt", SOURCE)
    editor.type_prompt("target_prompts", REPLACE)
    assert editor.widget_value(PLAN, "source_prompt") == SOURCE
    assert editor.widget_value(PLAN, "target_prompts") == REPLACE
    view = editor.view_for(SOURCE, REPLACE)
    assert view["editKind"] == "replace"
    assert {mark for _, mark in marks(view, "source")} == {"source"}
    expected = [(w, "replaced" if w == "tiger" else "kept") for w in REPLACE.split()]
    assert marks(view, "target") == expected
    assert view["warnings"] == []
    assert sorted(view["modes"]) == ["blend", "reweight"]
    # the shipped workflow saves a smaller plan node: the view grows it to show every prompt
    editor.page.wait_for_timeout(300)
    assert editor.js(f"() => ntiTest.clipped('{PLAN}', '{VIEW}')") <= 1
    editor.screenshot(PLAN, 1.3, VIEW, tmp_path / "token_view_replace.png")


def test_browser_token_view_marks_a_refine(editor: Editor, tmp_path: Path) -> None:
    editor.type_prompt("target_prompts", REFINE)
    view = editor.view_for(SOURCE, REFINE)
    assert view["editKind"] == "refine"
    expected = [(w, "added" if w == "tall" else "kept") for w in REFINE.split()]
    assert marks(view, "target") == expected
    editor.screenshot(PLAN, 1.3, VIEW, tmp_path / "token_view_refine.png")


def test_browser_token_view_shows_the_engines_warning(editor: Editor, tok, tmp_path) -> None:
    editor.type_prompt("target_prompts", REPLACE)
    editor.type_text_widget("reweight", "zebra:2")
    assert editor.widget_value(PLAN, "reweight") == "zebra:2"
    fields = {"source_prompt": SOURCE, "target_prompts": REPLACE, "reweight": "zebra:2"}
    with pytest.raises(ValueError) as refused:
        plan_spec.check_words(plan_spec.plan_from_fields(fields), tok)
    shown = editor.wait("() => { const v = ntiTest.view(); "
                        "return v && v.warnings.length ? v.warnings : null; }",
                        what="a plan warning")
    assert shown == [str(refused.value)]
    editor.screenshot(PLAN, 1.3, VIEW, tmp_path / "token_view_warning.png")
    editor.type_text_widget("reweight", "")
    editor.wait("() => ntiTest.view()?.warnings.length === 0", what="the warning to clear")


def test_browser_click_on_a_target_token_reweights_it(editor: Editor, tmp_path: Path) -> None:
    editor.type_prompt("target_prompts", REPLACE)
    editor.view_for(SOURCE, REPLACE)
    assert editor.widget_value(PLAN, "reweight") == ""
    editor.js(f"() => ntiTest.focus('{PLAN}', 1.1)")
    page = editor.page
    page.locator("select.nti-click-mode").select_option("reweight")
    page.locator("div.nti-prompt[data-role=target] span.nti-token[data-word=tiger]").click()
    written = editor.wait(f"() => ntiTest.widget('{PLAN}', 'reweight').value || null",
                          what="the click to write the reweight widget")
    assert written == "tiger:2"
    reweight = editor.wait("""() => { const t = ntiTest.view()?.prompts
        .find((p) => p.role === 'target').tokens.find((t) => t.word === 'tiger');
        return t && t.reweight; }""", what="tiger's data-reweight")
    assert float(reweight) == 2.0
    view = editor.js("() => ntiTest.view()")
    others = [t for p in view["prompts"] for t in p["tokens"] if t["word"] != "tiger"]
    assert all(t["reweight"] is None for t in others)
    editor.screenshot(PLAN, 1.3, VIEW, tmp_path / "token_view_reweight.png")


def test_browser_click_on_a_target_token_adds_a_blend_word(editor: Editor) -> None:
    editor.type_prompt("target_prompts", REPLACE)
    editor.view_for(SOURCE, REPLACE)
    editor.set_widgets({(PLAN, "blend_words"): ""})
    editor.js(f"() => ntiTest.focus('{PLAN}', 1.1)")
    page = editor.page
    page.locator("select.nti-click-mode").select_option("blend")
    target = "div.nti-prompt[data-role=target] span.nti-token[data-word={}]"
    page.locator(target.format("tiger")).click()
    assert editor.wait(f"() => ntiTest.widget('{PLAN}', 'blend_words').value || null",
                       what="the click to write blend_words") == "tiger"
    page.locator(target.format("mirror")).click()
    assert editor.wait(f"""() => {{ const v = ntiTest.widget('{PLAN}', 'blend_words').value;
        return v.includes('mirror') ? v : null; }}""", what="a second blend word") == "tiger, mirror"
    view = editor.wait("""() => { const v = ntiTest.view();
        return v && v.prompts.some((p) => p.tokens.some((t) => t.word === 'mirror' && t.blend))
            ? v : null; }""", what="the view re-rendered with the blend words")
    blended = {(p["role"], t["word"]) for p in view["prompts"] for t in p["tokens"] if t["blend"]}
    # a blend word is looked up in every prompt: 'mirror' in both, 'tiger' in the target only
    assert blended == {("source", "mirror"), ("target", "mirror"), ("target", "tiger")}
    editor.set_widgets({(PLAN, "blend_words"): ""})  # the run below is planned without them


def test_browser_run_draws_the_loss_curve(editor: Editor, finished_run, tmp_path: Path) -> None:
    (optimize,) = editor.js(f"() => app.graph.nodes.filter((n) => n.type === '{OPTIMIZE}')"
                            ".map((n) => String(n.id))")
    (losses,) = finished_run["history"]["outputs"][optimize]["nti_loss"]
    assert len(losses["first"]) == len(losses["final"]) == STEPS
    messages = finished_run["messages"]  # one per inversion step, live
    assert [m["step"] for m in messages] == list(range(STEPS))
    assert {(m["node"], m["total"]) for m in messages} == {(optimize, STEPS)}
    assert [m["first"] for m in messages] == pytest.approx(losses["first"])
    assert [m["final"] for m in messages] == pytest.approx(losses["final"])
    curve = editor.wait(f"() => {{ const c = ntiTest.curve(); return c && c.steps === {STEPS} "
                        "&& c; }", what="the loss curve")
    assert curve["total"] == STEPS and curve["width"] > 0 and curve["height"] > 0
    editor.screenshot(OPTIMIZE, 1.5, CURVE, tmp_path / "loss_curve.png")


def test_browser_loss_curve_survives_a_tab_switch(editor: Editor, finished_run,
                                                  tmp_path: Path) -> None:
    page = editor.page
    tabs = page.locator(".workflow-tab")
    assert tabs.count() >= 2, "the first visit opens a blank workflow beside the template"
    tabs.filter(has_not_text=TEMPLATE).first.click()
    editor.wait(f"() => !app.graph.nodes.some((n) => n.type === '{OPTIMIZE}')",
                what="the other workflow tab")
    tabs.filter(has_text=TEMPLATE).first.click()
    editor.wait(f"() => app.graph.nodes.some((n) => n.type === '{OPTIMIZE}')",
                what="the template's tab again")
    curve = editor.wait(f"() => {{ const c = ntiTest.curve(); return c && c.steps === {STEPS} "
                        "&& c; }", what="the loss curve after the tab switch")
    assert curve["total"] == STEPS
    editor.screenshot(OPTIMIZE, 1.5, CURVE, tmp_path / "loss_curve_after_tab_switch.png")
