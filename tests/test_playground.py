"""The playground page (sd/serve/static/) in a real browser: Debian's headless Chromium, driven by
selenium through Debian's chromium-driver, against a real `sd serve` process with the shipped tiny
model standing in for the img2img and inpainting ids, and an API token.

What a person does there: give the token once; generate from a prompt (the progress bar goes
through every step, the image's own PNG metadata shows its seed); reuse an image's settings and
seed, or the image itself as input; img2img from an uploaded picture (strength set by keyboard);
drop a picture on the page; inpaint with a mask painted by mouse strokes (the pixels outside it
unchanged); cancel a running job; see a bad input's error as the server words it; use it on a
phone-sized screen. Every test fails on any error in the browser's console, except the failed
responses (401, 400, 409) the test itself provokes.

One browser and one server serve the whole module; every wait is on a state of the page. Screenshots
go to test-artifacts/playground/ ($SD_TEST_ARTIFACTS), and with SD_PLAYGROUND_DOCS=1 the two the
README shows are written to docs/ as well. The browser and its driver are installed by scripts/test;
without them the module is skipped, except under CI (CI=true), where that is a failure.
"""

import base64
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from sd import shapes
from sd.tiny import CHECKPOINT

pytest.register_assert_rewrite("server_fixtures")
from server_fixtures import IMG2IMG, INPAINT, REPO, TOKEN, ServerProcess, wait_until  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# Without these, Chromium tries the network (closed here) for updates, sync, field trials ... and hangs.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
DESKTOP = {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}
PHONE = {"width": 375, "height": 812, "deviceScaleFactor": 2, "mobile": True}
ARTIFACTS = Path(os.environ.get("SD_TEST_ARTIFACTS", REPO / "test-artifacts")) / "playground"
DOCS = {"inpainting.png": "playground.png", "phone.png": "playground-phone.png"}
SMALL = {"width": 64, "height": 64}  # the tiny model's own size (the registry ids' defaults are 512)


def _browser_missing() -> str | None:
    if not (CHROMIUM and DRIVER):
        return "Debian's chromium and chromium-driver are not installed (scripts/test installs them)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the test extra has it)"
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("playground")
    srv = ServerProcess(["--weights-dir", str(folder), "--api-token", TOKEN, "--model", f"{IMG2IMG}={CHECKPOINT}",
                         "--model", f"{INPAINT}={CHECKPOINT}"], folder / "server.log", token=TOKEN)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def driver():
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser tests must run in CI: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="sd-playground-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)  # an explicit driver: nothing downloaded
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", DESKTOP)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


class Page:
    """The playground in the browser, with waits on its states."""

    def __init__(self, driver, url: str):
        self.driver, self.url, self.allowed = driver, url, set()

    def el(self, id_):
        from selenium.webdriver.common.by import By
        return self.driver.find_element(By.ID, id_)

    def all(self, css):
        from selenium.webdriver.common.by import By
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, condition, what: str, seconds: float = 120):
        """Until condition() is truthy; `seconds` only guards against a hang."""
        from selenium.webdriver.support.ui import WebDriverWait
        return WebDriverWait(self.driver, seconds, poll_frequency=0.05).until(lambda _: condition(), message=what)

    def open(self):
        self.driver.get(self.url)
        self.wait(lambda: self.js("return document.getElementById('model').value") == IMG2IMG, "the models listed")

    def text(self, id_) -> str:
        return self.el(id_).text

    def set(self, id_, value):
        field = self.el(id_)
        field.clear()
        field.send_keys(str(value))

    def fill(self, prompt: str, **numbers):
        self.set("prompt", prompt)
        for name, value in {**SMALL, **numbers}.items():
            self.set(name, value)

    def seed(self, mode: str, value=None):
        self.el("settings").find_element("css selector", f'input[name="seed-mode"][value="{mode}"]').click()
        if value is not None:
            self.set("seed", value)

    def results(self) -> list:
        return self.all("#gallery > li")

    def generate(self) -> dict:
        """Click Generate and wait for the new result; its PNG's own settings (read by PIL)."""
        before = len(self.results())
        self.el("generate").click()
        self.wait(lambda: len(self.results()) > before or self.el("errors").is_displayed(), "a result or an error")
        assert len(self.results()) > before, self.text("errors")
        self.wait(lambda: self.el("generate").is_enabled(), "the page ready again")
        return settings_of(self.png(self.results()[0]))

    def png(self, item) -> bytes:
        """The file a result shows (its data: URL), which is also what its Download link saves."""
        src = item.find_element("css selector", "img").get_attribute("src")
        assert item.find_element("link text", "Download").get_attribute("href") == src
        return base64.b64decode(src.removeprefix("data:image/png;base64,"))

    def shown(self, item) -> dict:
        """The settings the page shows under a result: {key: text}."""
        return {dd.get_attribute("class").removeprefix("setting-"): dd.text
                for dd in item.find_elements("css selector", "dd")}

    def screenshot(self, name: str):
        path = ARTIFACTS / name
        self.driver.save_screenshot(str(path))
        if os.environ.get("SD_PLAYGROUND_DOCS") and name in DOCS:
            shutil.copy(path, REPO / "docs" / DOCS[name])

    def console_errors(self) -> list[str]:
        """Errors in the browser's console since the last call, but failed responses the test provoked."""
        errors = []
        for entry in self.driver.get_log("browser"):
            if entry["level"] != "SEVERE":
                continue
            status = re.search(r"status of (\d{3})", entry["message"])
            if entry["source"] == "network" and status and int(status.group(1)) in self.allowed:
                continue
            errors.append(entry["message"])
        return errors


def settings_of(png: bytes) -> dict:
    return json.loads(Image.open(io.BytesIO(png)).info["sd"])


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


@pytest.fixture
def page(driver, server):
    """The page, freshly loaded at desktop size with the token kept in the browser; after the test,
    no error in the console."""
    p = Page(driver, server.url + "/")
    p.driver.get(p.url)
    if p.js("return localStorage.getItem('sd.apiToken')") != TOKEN:  # a test run alone: as the first test leaves it
        p.js("localStorage.setItem('sd.apiToken', arguments[0])", TOKEN)
    driver.get_log("browser")
    p.open()
    yield p
    assert p.console_errors() == []


@pytest.fixture
def picture(tmp_path) -> Path:
    """A picture of the tiny model's kind: a large red square on the right, blue background, 64x64."""
    scene = shapes.Scene("square", "red", "blue", "large", "right")
    path = tmp_path / "input.png"
    Image.fromarray(shapes.render(scene, np.random.default_rng(0))).save(path)
    return path


def test_the_token_is_asked_once_and_kept(driver, server):
    """With --api-token, the page asks for it (in the server's words), says when it is wrong, keeps it."""
    page = Page(driver, server.url + "/")
    page.allowed = {401}
    driver.get(page.url)
    page.js("localStorage.clear()")
    driver.get(page.url)
    dialog = page.el("token-dialog")
    page.wait(lambda: dialog.get_attribute("open") is not None, "the token asked for")
    assert "authorization: missing; send Authorization: Bearer <API token>" in page.text("token-message")
    page.screenshot("token.png")
    page.el("token").send_keys("not-the-token\n")
    page.wait(lambda: "authorization: wrong API token" in page.text("token-message"), "told it is wrong")
    assert dialog.get_attribute("open") is not None
    page.el("token").send_keys(TOKEN + "\n")
    page.wait(lambda: page.js("return document.getElementById('model').value") == IMG2IMG, "the models listed")
    assert dialog.get_attribute("open") is None
    assert page.js("return localStorage.getItem('sd.apiToken')") == TOKEN
    page.open()  # kept: not asked again
    assert page.el("token-dialog").get_attribute("open") is None
    assert page.console_errors() == []


def test_a_prompt_makes_an_image_through_every_step(page):
    """Ctrl+Enter generates; the bar goes through every step (each value the page gives it, recorded as
    it changes); the result shows the seed its own PNG carries."""
    from selenium.webdriver.common.keys import Keys
    page.fill("a small red circle on the left, blue background", num_steps=12)
    page.js("window.values = [];"
            "new MutationObserver(records => records.forEach(r => window.values.push(r.oldValue)))"
            ".observe(document.getElementById('progress'), {attributeFilter: ['value'], attributeOldValue: true});")
    page.el("prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    page.wait(lambda: len(page.results()) == 1, "the image")
    values = [int(v) for v in page.js("return window.values") + [page.el("progress").get_attribute("value")]]
    run = values.index(1)
    assert values[run:run + 12] == list(range(1, 13)), values
    assert page.el("live").get_attribute("src").startswith("data:image/png;base64,")
    item = page.results()[0]
    png = page.png(item)
    settings = settings_of(png)
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    assert settings["prompt"] == "a small red circle on the left, blue background" and settings["num_steps"] == 12
    shown = page.shown(item)
    assert shown["seed"] == str(settings["seed"]) and shown["size"] == "64×64" and shown["model"] == IMG2IMG
    assert page.text("progress-label").startswith("Done: 1 image in")
    page.screenshot("generate.png")


def test_settings_and_seeds_are_reused(page):
    """"Reuse settings" fills the form from an image's PNG and fixes its seed: the same image again;
    "Reuse last" sends the last result's seed; two images are two seeds in a row."""
    page.fill("a green triangle at the top, white background", num_steps=4, num_images=2)
    page.generate()
    first, second = page.results()[0], page.results()[1]  # a batch in its own order
    assert int(page.shown(second)["seed"]) == int(page.shown(first)["seed"]) + 1
    reused = page.results()[1]
    original = page.png(reused)
    reused.find_element("xpath", ".//button[text()='Reuse settings']").click()
    assert page.el("seed").get_attribute("value") == page.shown(reused)["seed"] and page.el("seed").is_enabled()
    assert page.el("prompt").get_attribute("value") == "a green triangle at the top, white background"
    page.set("num_images", 1)
    again = page.generate()
    assert again["seed"] == settings_of(original)["seed"]
    # made alone, not as the batch's second image: the same to within one level of rounding (README, Batches)
    assert np.abs(pixels(page.png(page.results()[0])) - pixels(original)).max() <= 1
    page.seed("last")
    assert page.el("seed").get_attribute("value") == str(again["seed"])
    assert page.generate()["seed"] == again["seed"]
    page.results()[0].find_element("xpath", ".//button[text()='Use as input']").click()
    page.wait(lambda: page.el("input-tools").is_displayed(), "the result as the input picture")
    assert page.js("return document.getElementById('input-image').naturalWidth") == 64
    assert page.text("mask-state").startswith("No mask painted")


def test_a_picture_dropped_on_the_page(page, picture):
    """Dropping a file (the drop event a browser fires, with the file in its DataTransfer) sets the input."""
    page.js("""const [name, b64] = arguments;
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], name, {type: 'image/png'}));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: files, bubbles: true}));""",
            picture.name, base64.b64encode(picture.read_bytes()).decode())
    page.wait(lambda: page.el("input-tools").is_displayed(), "the dropped picture shown")
    assert page.el("width").get_attribute("value") == "64"
    assert page.js("return document.getElementById('input-image').naturalWidth") == 64


def test_img2img_from_an_uploaded_picture(page, picture):
    """Pick a file; its size becomes the size; strength set with the keyboard (0.3: 3 of 10 steps):
    the result stays near the picture, where the same prompt and seed without it does not."""
    from selenium.webdriver.common.keys import Keys
    page.fill("a small green circle at the top, white background", num_steps=10)  # not the picture
    page.seed("fixed", 7)
    page.el("image-file").send_keys(str(picture))
    page.wait(lambda: page.el("input-tools").is_displayed(), "the picture shown")
    assert page.el("width").get_attribute("value") == "64" and page.el("height").get_attribute("value") == "64"
    strength = page.el("strength")
    strength.send_keys(Keys.HOME)
    for _ in range(6):
        strength.send_keys(Keys.ARROW_RIGHT)
    assert page.text("strength-value") == "0.30"
    from_picture = page.generate()
    assert from_picture["strength"] == 0.3 and from_picture["seed"] == 7
    near = np.abs(pixels(page.png(page.results()[0])) - np.asarray(Image.open(picture)).astype(int)).mean()
    page.el("image-remove").click()
    page.set("width", 64)
    page.set("height", 64)
    assert "strength" not in page.generate()
    far = np.abs(pixels(page.png(page.results()[0])) - np.asarray(Image.open(picture)).astype(int)).mean()
    print(f"[playground] img2img at strength 0.3: {near:.1f} levels from the picture; without it: {far:.1f}")
    assert near < far / 2


def test_inpainting_with_a_mask_painted_by_mouse_strokes(page, picture):
    """The inpainting model; a stroke down the left of the picture with a wide brush (set by keyboard),
    a dot erased from its end with a narrow one, the mask inverted and back: three results, each
    repainted under the mask and with every pixel outside it unchanged (the model keeps them exactly)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.select import Select
    Select(page.el("model")).select_by_value(INPAINT)
    page.fill("a small yellow circle on the left, blue background", num_steps=12, num_images=3)
    page.seed("fixed", 3)
    page.el("image-file").send_keys(str(picture))
    page.wait(lambda: page.el("input-tools").is_displayed(), "the picture shown")
    for _ in range(18):
        page.el("brush").send_keys(Keys.ARROW_RIGHT)
    assert page.text("brush-size") == "24 px"
    canvas = page.el("mask")
    width, height = canvas.size["width"], canvas.size["height"]
    at = lambda x, y: (round((x / 64 - 0.5) * width), round((y / 64 - 0.5) * height))  # noqa: E731 (from the centre)
    # a stroke down x = 19 from y = 12 to y = 52, in picture pixels
    ActionChains(page.driver).move_to_element_with_offset(canvas, *at(19, 12)).click_and_hold() \
        .move_to_element_with_offset(canvas, *at(19, 25)).move_to_element_with_offset(canvas, *at(19, 38)) \
        .move_to_element_with_offset(canvas, *at(19, 52)).release().perform()
    page.wait(lambda: "of the picture will be repainted" in page.text("mask-state"), "the mask counted")
    painted = mask_of(page)
    assert painted[20:44, 10:28].all() and not painted[:, 34:].any()  # a 24-pixel band round x = 19
    for _ in range(18):
        page.el("brush").send_keys(Keys.ARROW_LEFT)
    page.el("erase").click()
    ActionChains(page.driver).move_to_element_with_offset(canvas, *at(19, 4)).click().perform()
    page.wait(lambda: not mask_of(page)[4, 19], "a dot erased")
    assert mask_of(page)[12, 19]
    page.el("erase").click()
    page.el("mask-invert").click()
    page.wait(lambda: mask_of(page)[:, 34:].all(), "the mask inverted")
    page.el("mask-invert").click()
    page.wait(lambda: not mask_of(page)[:, 34:].any(), "inverted back")
    alpha = mask_alpha(page)
    page.generate()
    kept, repainted = alpha == 0, alpha == 255  # the anti-aliased edge of a stroke counts as neither here
    assert kept.sum() > 2000 and repainted.sum() > 500
    before = np.asarray(Image.open(picture)).astype(int)
    seeds = []
    for item in page.results()[:3]:
        png = page.png(item)
        settings = settings_of(png)
        assert settings["keep_unmasked"] is True and settings["strength"] == 1.0
        seeds.append(settings["seed"])
        result = pixels(png)
        assert np.array_equal(result[kept], before[kept])
        assert np.abs(result[repainted] - before[repainted]).max() > 30
    assert seeds == [3, 4, 5]
    page.js("document.getElementById('input').scrollIntoView({block: 'start'})")
    page.screenshot("inpainting.png")


def mask_alpha(page) -> np.ndarray:
    """The mask canvas's alpha (64x64): the paint."""
    data = page.js("const c = document.getElementById('mask');"
                   "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);")
    return np.array(data).reshape(64, 64, 4)[..., 3]


def mask_of(page) -> np.ndarray:
    """The painted pixels, as the page sends them (alpha at least 128)."""
    return mask_alpha(page) >= 128


def test_cancel_stops_the_running_job(page, server):
    page.allowed = {409}  # the generate request's answer: cancelled
    page.fill("a small orange circle on the right, black background", num_steps=1000)
    before = len(page.results())
    page.el("generate").click()
    page.wait(lambda: page.text("progress-label").startswith("Step "), "running")
    page.el("cancel").click()
    page.wait(lambda: page.text("progress-label").startswith("Stopped at step "), "stopped")
    step, steps = map(int, re.search(r"step (\d+)/(\d+)", page.text("progress-label")).groups())
    assert steps == 1000 and 1 <= step < 1000
    page.wait(lambda: page.el("generate").is_enabled(), "ready again")
    assert len(page.results()) == before and page.el("errors").get_attribute("hidden") is not None
    wait_until(lambda: httpx.get(server.url + "/healthz").json()["running"] is None, "the worker free")


def test_a_bad_input_shows_the_servers_words(page):
    page.allowed = {400}
    page.fill("a red circle", width=60)
    page.el("generate").click()
    page.wait(lambda: page.el("errors").is_displayed(), "the error shown")
    assert "width: must be a positive multiple of 8, got 60" in page.text("errors")
    assert page.text("errors").startswith("The server answered 400:")
    assert page.el("width").get_attribute("aria-invalid") == "true"
    page.screenshot("error.png")


def test_every_control_is_labelled_and_keyboard_focus_shows(page):
    from selenium.webdriver.common.keys import Keys
    unlabelled = page.js("""
        return [...document.querySelectorAll('input, select, textarea, button, canvas')]
          .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                       && !e.getAttribute('aria-labelledby') && !(e.tagName === 'BUTTON' && e.textContent.trim()))
          .map(e => e.id || e.outerHTML.slice(0, 60));""")
    assert unlabelled == []
    page.el("prompt").click()
    page.el("prompt").send_keys(Keys.TAB)
    focused = page.driver.switch_to.active_element
    assert focused.get_attribute("id") == "negative_prompt"
    assert page.js("return getComputedStyle(document.activeElement).outlineStyle") != "none"


def test_a_phone_sized_screen(page):
    """375 px wide: one column, nothing wider than the screen, every control inside it; a result."""
    page.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    try:
        page.open()
        assert page.js("return document.documentElement.scrollWidth") <= PHONE["width"]
        outside = page.js("""return [...document.querySelectorAll('input, select, textarea, button')]
            .filter(e => e.offsetParent !== null)
            .filter(e => { const r = e.getBoundingClientRect(); return r.left < 0 || r.right > innerWidth; })
            .map(e => e.id);""")
        assert outside == []
        page.screenshot("phone.png")
        page.fill("a large yellow square at the bottom, green background", num_steps=16)
        page.generate()
        assert page.js("return document.documentElement.scrollWidth") <= PHONE["width"]
        page.results()[0].location_once_scrolled_into_view  # noqa: B018 (scrolls)
        page.screenshot("phone-result.png")
    finally:
        page.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", DESKTOP)
