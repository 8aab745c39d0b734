#!/usr/bin/env python3
"""Click through a running AUTOMATIC1111 / Forge / reForge web UI with the ReNeg extension, as a user.

Drives headless Chromium (the distribution's ``chromium`` and ``chromium-driver`` packages)
with Selenium; nothing is downloaded. It checks, in the txt2img tab:

1. the ReNeg accordion, its dropdown and status line (and saves ``a1111-panel.png``);
2. a generation with the embedding and one without it, same seed: the first image's
   parameters carry ``ReNeg: <file>, ReNeg strength: ..., ReNeg hash: ...``, the second's
   none, and the status line now names the loaded model's family (``a1111-generation.png``,
   ``a1111-comparison.png``);
3. an X/Y/Z plot of ``[ReNeg] Embedding`` (None, the file) x ``[ReNeg] Strength`` (0, 1)
   with sub-images: every cell's parameters say ReNeg exactly where it was used
   (``a1111-xyz.png``).

Each image's parameters are read from the page (the info under the gallery) and, where the
server hands out the saved PNG, from the file's own ``parameters`` text chunk.

Usage (the web UI running, the embedding in ``models/reneg``, a model selected)::

    python tools/a1111_browser_check.py --url http://127.0.0.1:7860 \\
        --embedding sd1.5_reneg_emb.bin --out shots/ [--size 512 --steps 20]

Exit status 0 when every check passed; the report is printed and written to ``report.json``.
Needs ``pip install selenium`` (and Pillow to stitch the comparison image).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import time
import urllib.request

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - said plainly below
    webdriver = None

TAB = "txt2img"
ACC = f"script_{TAB}_reneg_enabled"
DROPDOWN = f"script_{TAB}_reneg_embedding"
STATUS = f"script_{TAB}_reneg_status"
XYZ = f"script_{TAB}_xyz_plot"


class Check:
    def __init__(self, out: str):
        self.out = out
        self.results: list[dict] = []

    def ok(self, name: str, passed: bool, detail: str = "") -> bool:
        self.results.append({"check": name, "passed": bool(passed), "detail": detail})
        print(f"[{'PASS' if passed else 'FAIL'}] {name}" + (f": {detail}" if detail else ""), flush=True)
        return passed

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r["passed"] for r in self.results)


def make_driver(chromium: str | None, chromedriver: str | None, width: int, height: int):
    opts = webdriver.ChromeOptions()
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
    ):
        opts.add_argument(a)
    binary = chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        opts.binary_location = binary
    driver_path = chromedriver or shutil.which("chromedriver") or "/usr/bin/chromedriver"
    service = webdriver.ChromeService(executable_path=driver_path)
    return webdriver.Chrome(service=service, options=opts)


class Page:
    def __init__(self, driver, timeout: float):
        self.d = driver
        self.timeout = timeout

    def wait(self, cond, timeout=None, what="the page"):
        try:
            return WebDriverWait(self.d, timeout or self.timeout, poll_frequency=0.5).until(lambda d: cond())
        except TimeoutException:
            raise RuntimeError(f"timed out waiting for {what}") from None

    def by_id(self, elem_id: str):
        found = self.d.find_elements(By.ID, elem_id)
        return found[0] if found else None

    def need(self, elem_id: str, timeout=None):
        return self.wait(lambda: self.by_id(elem_id), timeout, f"#{elem_id}")

    def show(self, el):
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
        time.sleep(0.3)

    def click(self, el):
        self.show(el)
        try:
            el.click()
        except WebDriverException:
            self.d.execute_script("arguments[0].click();", el)

    def text(self, elem_id: str) -> str:
        el = self.by_id(elem_id)
        return el.text.strip() if el is not None else ""

    def set_input(self, elem_id: str, value, selector: str = "input, textarea"):
        """Type into a gradio Textbox / Number / Slider's number box, then let it fire its change."""
        root = self.need(elem_id)
        box = [b for b in root.find_elements(By.CSS_SELECTOR, selector) if b.get_attribute("type") != "range"]
        box = box[0]
        self.show(box)
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value))
        box.send_keys(Keys.TAB)
        time.sleep(0.3)

    def set_checkbox(self, elem_id: str, checked: bool):
        root = self.need(elem_id)
        box = root if root.tag_name == "input" else root.find_element(By.CSS_SELECTOR, "input[type=checkbox]")
        if box.is_selected() != checked:
            self.click(box)
            time.sleep(0.3)

    def dropdown_options(self, elem_id: str) -> list[str]:
        root = self.need(elem_id)
        box = root.find_element(By.CSS_SELECTOR, "input")
        current = box.get_attribute("value")
        self.click(box)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)  # an empty filter lists every option
        time.sleep(0.5)
        items = [li.text.strip() for li in self.d.find_elements(By.CSS_SELECTOR, "ul.options li")]
        box.send_keys(current)
        box.send_keys(Keys.ESCAPE)
        self.d.execute_script("document.activeElement && document.activeElement.blur();")
        time.sleep(0.3)
        return [i.lstrip("✓").strip() for i in items if i]

    def choose(self, elem_id: str, label: str):
        """Pick ``label`` in a gradio Dropdown as a user typing it does: the text filters the options
        and Enter takes the first match (or, where custom values are allowed, the typed text)."""
        root = self.need(elem_id)
        box = root.find_element(By.CSS_SELECTOR, "input")
        self.click(box)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        box.send_keys(label)
        time.sleep(0.5)
        box.send_keys(Keys.ENTER)
        time.sleep(0.5)
        self.d.execute_script("document.activeElement && document.activeElement.blur();")
        time.sleep(0.5)
        return box.get_attribute("value")

    def shot(self, path: str, el=None):
        if el is not None:
            self.show(el)
            el.screenshot(path)
        else:
            self.d.save_screenshot(path)
        print(f"  screenshot: {path}", flush=True)


# --------------------------------------------------------------------------- generation helpers


def info_text(page: Page) -> str:
    return page.text(f"html_info_{TAB}")


def generate(page: Page, timeout: float) -> str:
    """Press Generate and return the new generation info text."""
    before_info, before_images = info_text(page), image_urls(page)
    page.click(page.need(f"{TAB}_generate"))
    time.sleep(1.0)

    def done():
        busy = page.by_id(f"{TAB}_interrupt")
        if busy is not None and busy.is_displayed():
            return False
        now = info_text(page)
        # an X/Y/Z grid's info can read exactly like the previous image's: new images count too
        changed = now != before_info or image_urls(page) != before_images
        return bool(now) and changed and ("Steps:" in now or "Error" in now)

    page.wait(done, timeout, "the generation to finish")
    time.sleep(1.0)
    return info_text(page)


def image_urls(page: Page) -> list[str]:
    root = page.by_id(f"{TAB}_gallery")
    if root is None:
        return []
    urls = []
    for img in root.find_elements(By.CSS_SELECTOR, ".thumbnail-item img, button.thumbnail-item img"):
        src = img.get_attribute("src")
        if src and src not in urls:
            urls.append(src)
    return urls


def gallery_items(page: Page):
    root = page.need(f"{TAB}_gallery")
    return root.find_elements(By.CSS_SELECTOR, "button.thumbnail-item, .thumbnail-item")


def png_parameters(url: str) -> str | None:
    """The ``parameters`` text chunk of the PNG the server hands out, or None."""
    try:
        from PIL import Image

        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
        return Image.open(io.BytesIO(data)).info.get("parameters")
    except Exception:  # not a PNG with parameters (e.g. a re-encoded cache copy)
        return None


def cell_infos(page: Page, expected: int) -> list[tuple[str, str | None]]:
    """For each gallery image: (the info shown when it is selected, its PNG's parameters)."""
    out = []
    items = gallery_items(page)
    urls = image_urls(page)
    for i in range(min(expected, len(items))):
        items = gallery_items(page)
        before = info_text(page)
        page.click(items[i])
        try:
            page.wait(lambda b=before: info_text(page) != b, 10, "the image's info")
        except RuntimeError:
            pass
        time.sleep(0.5)
        out.append((info_text(page), png_parameters(urls[i]) if i < len(urls) else None))
    return out


def reneg_keys(text: str) -> dict:
    return dict(re.findall(r"(ReNeg(?: strength| hash| hires)?): ([^,\n]+)", text or ""))


# --------------------------------------------------------------------------- the checks


def wait_for_server(url: str, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=10):
                return True
        except OSError:
            time.sleep(3)
    return False


def run(args) -> Check:
    os.makedirs(args.out, exist_ok=True)
    check = Check(args.out)
    if not check.ok("web UI answers", wait_for_server(args.url, args.start_timeout), args.url):
        return check
    driver = make_driver(args.chromium, args.chromedriver, 1400, 1800)
    page = Page(driver, args.timeout)
    try:
        driver.get(args.url)
        page.need(f"{TAB}_prompt", timeout=120)
        time.sleep(3)  # the web UI's own scripts finish setting up the accordions

        # 1. the panel
        acc = page.by_id(ACC)
        if not check.ok("ReNeg accordion present in txt2img", acc is not None):
            return check
        if "open" not in (acc.find_element(By.CSS_SELECTOR, ".label-wrap").get_attribute("class") or ""):
            page.click(acc.find_element(By.CSS_SELECTOR, ".label-wrap"))
            time.sleep(1)
        enabled = driver.find_elements(By.ID, f"{ACC}-visible-checkbox")
        check.ok(
            "opening the accordion turns ReNeg on",
            bool(enabled) and enabled[0].is_selected(),
            "(no visible checkbox: a host without input accordions)" if not enabled else "",
        )
        status_before = page.text(STATUS)
        check.ok("status line shown", bool(status_before), status_before)
        options = page.dropdown_options(DROPDOWN)
        check.ok("dropdown lists the embedding", args.embedding in options, f"options: {options}")
        check.ok("dropdown offers None", "None" in options)
        page.choose(DROPDOWN, args.embedding)
        page.click(page.need(f"script_{TAB}_reneg_refresh"))  # the server answers with the value it received
        time.sleep(3)
        chosen = page.by_id(DROPDOWN).find_element(By.CSS_SELECTOR, "input").get_attribute("value")
        check.ok("embedding selected (as the server sees it)", chosen == args.embedding, chosen)
        page.shot(os.path.join(args.out, "a1111-panel.png"), acc)

        # 2. one generation with ReNeg, one without, same seed
        page.set_input(f"{TAB}_prompt", args.prompt, "textarea")
        page.set_input(f"{TAB}_width", args.size, "input[type=number]")
        page.set_input(f"{TAB}_height", args.size, "input[type=number]")
        page.set_input(f"{TAB}_steps", args.steps, "input[type=number]")
        page.set_input(f"{TAB}_seed", args.seed, "input")
        info = generate(page, args.gen_timeout)
        keys = reneg_keys(info)
        check.ok("generation parameters name the embedding", keys.get("ReNeg") == args.embedding, info)
        check.ok(
            "generation parameters carry strength and hash",
            "ReNeg strength" in keys and re.fullmatch(r"[0-9a-f]{10}", keys.get("ReNeg hash", "")) is not None,
        )
        png = png_parameters(image_urls(page)[0]) if image_urls(page) else None
        if png is not None:
            check.ok("the PNG's own parameters name the embedding", reneg_keys(png).get("ReNeg") == args.embedding)
        status_after = page.text(STATUS)
        check.ok(
            "status follows the loaded model without a click",
            "no model is loaded yet" not in status_after and "for Stable Diffusion" in status_after,
            status_after,
        )
        page.shot(os.path.join(args.out, "a1111-generation.png"))
        with_shot = os.path.join(args.out, "with-reneg.png")
        page.shot(with_shot, page.need(f"{TAB}_gallery"))

        page.set_checkbox(f"{ACC}-visible-checkbox", False) if enabled else page.set_checkbox(ACC, False)
        info_off = generate(page, args.gen_timeout)
        check.ok("a generation without ReNeg carries no ReNeg key", not reneg_keys(info_off), info_off)
        without_shot = os.path.join(args.out, "without-reneg.png")
        page.shot(without_shot, page.need(f"{TAB}_gallery"))
        stitch(without_shot, with_shot, os.path.join(args.out, "a1111-comparison.png"))

        # 3. X/Y/Z plot: Embedding (None, file) x Strength (0, 1), with sub-images
        page.choose("script_list", "X/Y/Z plot")
        page.need(f"{XYZ}_x_type", timeout=20)
        page.set_checkbox(f"{XYZ}_csv_mode", True)  # text boxes for every axis
        page.choose(f"{XYZ}_x_type", "[ReNeg] Embedding")
        page.set_input(f"{XYZ}_x_values", f"None, {args.embedding}", "input, textarea")
        page.choose(f"{XYZ}_y_type", "[ReNeg] Strength")
        page.set_input(f"{XYZ}_y_values", "0, 1", "input, textarea")
        page.set_checkbox(f"{XYZ}_include_lone_images", True)
        info_grid = generate(page, args.gen_timeout * 5)
        check.ok("X/Y/Z plot ran", "Steps:" in info_grid, info_grid[:200])
        page.shot(os.path.join(args.out, "a1111-xyz.png"), page.need(f"{TAB}_gallery"))
        cells = cell_infos(page, 5)[1:]  # the grid first, then the cells in x-then-y order
        expect = [("None", "0"), (args.embedding, "0"), ("None", "1"), (args.embedding, "1")]
        check.ok("X/Y/Z gallery holds the grid and four cells", len(cells) == 4, f"{len(cells)} cells")
        for (shown, png), (name, strength) in zip(cells, expect):
            for source, text in (("page", shown), ("PNG", png)):
                if text is None:
                    continue
                k = reneg_keys(text)
                if name == "None":
                    check.ok(f"cell None x {strength} ({source}): no ReNeg key", not k, str(k))
                else:
                    check.ok(
                        f"cell {name} x {strength} ({source}): its own ReNeg keys",
                        k.get("ReNeg") == name
                        and float(k.get("ReNeg strength", "nan")) == float(strength)
                        and "ReNeg hires" not in k,
                        str(k),
                    )
        page.choose("script_list", "None")
    except Exception as e:  # report what happened; the screenshot shows where
        check.ok("browser session", False, f"{type(e).__name__}: {e}")
        try:
            page.shot(os.path.join(args.out, "failure.png"))
        except Exception:
            pass
    finally:
        driver.quit()
    return check


def stitch(left: str, right: str, out: str) -> None:
    try:
        from PIL import Image
    except ImportError:
        return
    a, b = Image.open(left), Image.open(right)
    h = max(a.height, b.height)
    img = Image.new("RGB", (a.width + b.width + 8, h), "white")
    img.paste(a, (0, 0))
    img.paste(b, (a.width + 8, 0))
    img.save(out)
    print(f"  screenshot: {out}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:7860", help="the running web UI")
    ap.add_argument("--embedding", required=True, help="a file name as the ReNeg dropdown lists it")
    ap.add_argument("--out", default="a1111-browser-check", help="folder for screenshots and report.json")
    ap.add_argument("--prompt", default="a lighthouse on a cliff at dawn, oil painting")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--timeout", type=float, default=60, help="seconds to wait for the page")
    ap.add_argument("--start-timeout", type=float, default=300, help="seconds to wait for the web UI to answer")
    ap.add_argument("--gen-timeout", type=float, default=600, help="seconds to wait for one generation")
    ap.add_argument("--chromium", help="the browser binary (default: chromium on PATH)")
    ap.add_argument("--chromedriver", help="the driver binary (default: chromedriver on PATH)")
    args = ap.parse_args(argv)
    if webdriver is None:
        print(
            "a1111_browser_check: needs Selenium: pip install selenium (and apt-get install chromium chromium-driver)",
            file=sys.stderr,
        )
        return 2
    check = run(args)
    with open(os.path.join(args.out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(
            {"url": args.url, "embedding": args.embedding, "passed": check.passed, "results": check.results},
            f,
            indent=2,
        )
    print(f"{sum(r['passed'] for r in check.results)}/{len(check.results)} checks passed", flush=True)
    return 0 if check.passed else 1


if __name__ == "__main__":
    sys.exit(main())
