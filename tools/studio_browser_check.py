"""Check ``reneg studio --demo`` in a real browser and take the docs' screenshots.

Starts the app on 127.0.0.1, drives headless Chromium with Selenium (Debian: ``apt-get install
chromium chromium-driver``; ``pip install selenium``) through every tab: a demo training run is
started from the page, shows progress and sample images, is stopped (checkpoint) and resumed to the
end; one prompt is tuned; ``reneg eval`` compares null, handcrafted and the learned negative; the
Embeddings tab lists the files. Screenshots go to ``docs/images/studio_*.png``. Exits non-zero,
naming the step, when the page does not show what it should.

    python tools/studio_browser_check.py [--steps 40] [--batch 16] [--work /tmp/studio-check]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(ROOT, "docs", "images")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Check:
    def __init__(self, driver, shots: str):
        self.d, self.shots = driver, shots

    def wait(self, what: str, pred, timeout: float):
        t0 = time.time()
        last = None
        while time.time() - t0 < timeout:
            try:
                last = pred()
                if last:
                    print(f"  ok  {what} ({time.time() - t0:.0f} s)", flush=True)
                    return last
            except Exception as e:  # noqa: BLE001 - the page is still rendering
                last = e
            time.sleep(1)
        self.shot("failed")
        raise SystemExit(f"studio browser check: timed out waiting for: {what} (last: {str(last)[:200]})")

    def text(self, elem_id: str) -> str:
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.ID, elem_id).text

    def click(self, elem_id: str) -> None:
        from selenium.webdriver.common.by import By

        el = self.d.find_element(By.ID, elem_id)
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
        el.click()

    def tab(self, name: str) -> None:
        from selenium.webdriver.common.by import By

        for b in self.d.find_elements(By.CSS_SELECTOR, "button[role='tab']"):
            if b.text.strip() == name:
                b.click()
                time.sleep(1)
                return
        raise SystemExit(f"studio browser check: no tab named {name}")

    def set_number(self, elem_id: str, value) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        el = self.d.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
        el.click()
        el.send_keys(Keys.CONTROL, "a")
        el.send_keys(str(value))
        el.send_keys(Keys.TAB)

    def images_in(self, elem_id: str) -> int:
        from selenium.webdriver.common.by import By

        imgs = self.d.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
        return sum(1 for i in imgs if self.d.execute_script("return arguments[0].naturalWidth", i) > 0)

    def shot(self, name: str, top: bool = True) -> str:
        if top:
            self.d.execute_script("window.scrollTo(0, 0);")
            time.sleep(0.5)
        path = os.path.join(self.shots, f"studio_{name}.png")
        self.d.save_screenshot(path)
        print(f"  wrote {os.path.relpath(path, ROOT)}", flush=True)
        return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="training steps of the demo run (the demo's own: 160)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sample-every", type=int, default=None, help="default: steps / 8")
    ap.add_argument(
        "--sampling-steps",
        type=int,
        default=None,
        help="DDIM steps in every tab (default: the demo's 30); fewer for a quick check on a busy machine",
    )
    ap.add_argument("--tune-steps", type=int, default=None, help="Tune's max steps N (default: the paper's 10)")
    ap.add_argument("--heldout", type=int, default=32, help="held-out prompts scored (the demo's own: 32)")
    ap.add_argument("--compare-prompts", type=int, default=16)
    ap.add_argument("--compare-images", type=int, default=4, help="images per prompt in Compare")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for any one thing")
    ap.add_argument("--work", default=None, help="folder for the app's runs (default: a new temporary folder)")
    ap.add_argument("--shots", default=IMAGES)
    ap.add_argument("--chromedriver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    ap.add_argument("--skip-compare", action="store_true")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="only load the page and try a bad input (any gradio version, no training); screenshot studio_quick.png",
    )
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the app and the browser on kill
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    work = a.work or tempfile.mkdtemp(prefix="studio-check-")
    os.makedirs(work, exist_ok=True)
    os.makedirs(a.shots, exist_ok=True)
    port = free_port()
    log = open(os.path.join(work, "app.log"), "w")  # noqa: SIM115 - the app's output, closed at the end
    app = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reneg.cli",
            "studio",
            "--demo",
            "--port",
            str(port),
            "--root",
            os.path.join(work, "runs"),
        ],
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    opts = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1700",
        "--hide-scrollbars",
    ):
        opts.add_argument(arg)
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"
        t0 = time.time()
        while time.time() - t0 < 120:
            with open(os.path.join(work, "app.log")) as f:
                text = f.read()
            if f"ReNeg Studio: http://127.0.0.1:{port}" in text:
                break
            if app.poll() is not None:
                raise SystemExit(f"studio browser check: the app exited:\n{text}")
            time.sleep(1)
        else:
            raise SystemExit("studio browser check: the app printed no address in 120 s")
        print(f"app at {url} (runs in {work})", flush=True)
        driver = webdriver.Chrome(service=Service(a.chromedriver), options=opts)
        driver.get(url)
        c = Check(driver, a.shots)
        c.wait(
            "the page loads with the Train tab filled in",
            lambda: "ReNeg Studio" in driver.page_source and c.text("train_status"),
            max(60, a.timeout),
        )

        # -- Train: a shorter demo run, started from the page
        from selenium.webdriver.common.by import By

        driver.find_element(By.XPATH, "//*[normalize-space(text())='Recipe (defaults as reneg train)']").click()
        time.sleep(1)
        every = a.sample_every or max(1, a.steps // 8)
        # a bad value: one readable line in the page, nothing started
        c.set_number("train_steps", 0)
        c.click("train_start")
        c.wait(
            "a bad input gets a readable message",
            lambda: "--steps must be a positive integer" in c.text("train_action"),
            60,
        )
        if a.quick:
            c.shot("quick", top=False)
            print("studio browser check (quick): passed", flush=True)
            return 0
        c.set_number("train_steps", a.steps)
        c.set_number("train_batch_size", a.batch)
        c.set_number("train_micro_batch", a.batch)
        c.set_number("train_sample_every", every)
        c.set_number("train_eval_every", max(1, a.steps // 2))
        c.set_number("train_heldout_count", a.heldout)
        if a.sampling_steps:
            c.set_number("train_sampling_steps", a.sampling_steps)
            c.set_number("train_grad_hi", min(10, a.sampling_steps // 3))
        c.set_number("train_eval_batch", a.heldout)
        c.click("train_start")
        c.wait("the run starts", lambda: "Started" in c.text("train_action"), max(30, a.timeout))
        c.wait(
            "progress: step and time left",
            lambda: "Running: step" in c.text("train_status") and "left" in c.text("train_status"),
            max(300, a.timeout),
        )
        c.wait("sample images", lambda: c.images_in("train_latest") >= 1, max(300, a.timeout))
        c.wait(f"step {2 * every}", lambda: _step(c.text("train_status")) >= 2 * every, max(600, a.timeout))
        c.shot("train_running")
        c.click("train_stop")
        c.wait("Stop keeps a checkpoint", lambda: "Stopped at step" in c.text("train_status"), max(300, a.timeout))
        stopped = c.text("train_status")
        c.click("train_resume")
        c.wait("Resume continues", lambda: "Running: step" in c.text("train_status"), max(300, a.timeout))
        c.wait("the run finishes", lambda: "Finished" in c.text("train_status"), max(60 * 30, a.timeout))
        time.sleep(3)
        c.shot("train")
        print(f"  {stopped.splitlines()[0]}\n  {c.text('train_status').splitlines()[0]}", flush=True)

        # -- Tune
        c.tab("Tune")
        if a.sampling_steps:
            c.set_number("tune_sampling_steps", a.sampling_steps)
            c.set_number("tune_grad_hi", min(10, a.sampling_steps // 3))
        if a.tune_steps:
            c.set_number("tune_max_steps", a.tune_steps)
            c.set_number("tune_patience", min(3, a.tune_steps))
        c.click("tune_start")
        c.wait("each step's image and reward", lambda: c.images_in("tune_gallery") >= 1, max(300, a.timeout))
        c.wait("tuning ends", lambda: "Done" in c.text("tune_status"), max(600, a.timeout))
        c.shot("tune")

        # -- Compare
        if not a.skip_compare:
            c.tab("Compare")
            driver.find_element(By.XPATH, "//*[normalize-space(text())='Settings']").click()
            time.sleep(1)
            c.set_number("compare_limit", a.compare_prompts)
            c.set_number("compare_images_per_prompt", a.compare_images)
            if a.sampling_steps:
                c.set_number("compare_sampling_steps", a.sampling_steps)
            c.click("compare_start")
            c.wait("reneg eval's report", lambda: c.text("compare_status").startswith("Done"), max(60 * 20, a.timeout))
            time.sleep(2)
            c.shot("compare")

        # -- Embeddings
        c.tab("Embeddings")
        c.click("emb_list")
        c.wait("the embedding files", lambda: "embedding files under" in driver.page_source, max(120, a.timeout))
        time.sleep(2)
        c.shot("embeddings")
        print("studio browser check: passed", flush=True)
        return 0
    finally:
        if driver is not None:
            driver.quit()
        try:
            os.killpg(app.pid, signal.SIGTERM)
        except OSError:
            pass
        app.wait(30)
        log.close()


def _step(status: str) -> int:
    import re

    m = re.search(r"step (\d+)", status)
    return int(m.group(1)) if m else 0


if __name__ == "__main__":
    sys.exit(main())
