"""Check ``reneg studio --demo`` in a real browser and take the docs' screenshots.

Starts the app on 127.0.0.1, drives headless Chromium with Selenium (Debian: ``apt-get install
chromium chromium-driver``; ``pip install selenium``) through every tab: a demo training run is
started from the page, shows progress and sample images, is stopped (checkpoint), the page is reloaded
(the form comes back with the run's settings) and the run is resumed to the end; one prompt is tuned
(with a seed beyond a float's precision, which the saved file must carry exactly); ``reneg eval``
compares null, handcrafted and the learned negative; the Embeddings tab lists the files. Screenshots go to ``docs/images/studio_*.png``. Exits non-zero,
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

    def value(self, elem_id: str) -> str:
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.CSS_SELECTOR, f"#{elem_id} input, #{elem_id} textarea").get_attribute("value")

    def set_number(self, elem_id: str, value) -> None:
        """Type into a field (a number or a text field)."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        el = self.d.find_element(By.CSS_SELECTOR, f"#{elem_id} input, #{elem_id} textarea")
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
        el.click()
        el.send_keys(Keys.CONTROL, "a")
        el.send_keys(str(value))
        el.send_keys(Keys.TAB)

    def images_in(self, elem_id: str) -> int:
        from selenium.webdriver.common.by import By

        imgs = self.d.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
        return sum(1 for i in imgs if self.d.execute_script("return arguments[0].naturalWidth", i) > 0)

    def cut_off(self, elem_id: str, css: str) -> list[str]:
        """The ``css`` elements inside ``elem_id`` that a clipping (scrolling) box around them cuts."""
        return self.d.execute_script(
            """
            const root = document.getElementById(arguments[0]);
            const bad = [];
            for (const el of root.querySelectorAll(arguments[1])) {
                const r = el.getBoundingClientRect();
                for (let box = el.parentElement; box && root.contains(box); box = box.parentElement) {
                    const s = getComputedStyle(box);
                    if (s.overflow === 'visible' && s.overflowY === 'visible' && s.overflowX === 'visible') continue;
                    const b = box.getBoundingClientRect();
                    if (r.top < b.top - 1 || r.bottom > b.bottom + 1 || r.left < b.left - 1 || r.right > b.right + 1) {
                        bad.push((el.textContent || el.getAttribute('src') || el.tagName).slice(0, 60));
                        break;
                    }
                }
            }
            return bad;
            """,
            elem_id,
            css,
        )

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
        header = c.text("header")
        if header.lower().count("demo world") != 1:
            raise SystemExit(f"studio browser check: the header names the demo world more than once: {header!r}")

        # -- Train: a shorter demo run, started from the page
        from selenium.webdriver.common.by import By

        driver.find_element(By.XPATH, "//*[normalize-space(text())='Recipe (defaults as reneg train)']").click()
        time.sleep(1)
        every = a.sample_every or max(1, a.steps // 8)
        # a bad value: one readable line in the page, nothing started
        c.set_number("train_steps", 0)
        c.click("train_start")
        c.wait(
            "a bad input gets a readable message naming the field",
            lambda: '"steps" must be a positive integer' in c.text("train_action"),
            60,
        )
        c.set_number("train_steps", 2.5)
        c.click("train_start")
        c.wait(
            "a fraction in a whole-number field is refused, not rounded",
            lambda: '"steps": expected a whole number, got 2.5' in c.text("train_action"),
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
        # the page is reloaded: the form comes back with the run's settings, and Resume continues it
        driver.refresh()
        c.wait("the reloaded page finds the stopped run", lambda: "Stopped at step" in c.text("train_status"), 120)
        driver.find_element(By.XPATH, "//*[normalize-space(text())='Recipe (defaults as reneg train)']").click()
        time.sleep(1)
        c.wait(
            "the reloaded form shows the run's settings",
            lambda: (c.value("train_steps"), c.value("train_sample_every")) == (str(a.steps), str(every)),
            60,
        )
        run_dir = os.path.join(work, "runs", "studio-demo")
        first = _step_seconds(os.path.join(run_dir, "log.csv"))
        c.click("train_resume")
        c.wait("Resume starts", lambda: "Resumed" in c.text("train_action"), 60)
        seen = []

        def resumed_and_timed():
            st = c.text("train_status")
            seen.append(st)
            return "Running: step" in st and " s a step" in st and st

        st = c.wait("Resume continues, with a time per step", resumed_and_timed, max(300, a.timeout))
        if any("Training the first step" in x for x in seen):
            raise SystemExit(f"studio browser check: a resumed run was said to train its first step: {seen}")
        with open(os.path.join(run_dir, "studio_train.log")) as f:
            cmd = [ln for ln in f if ln.startswith("$ ")][-1]
        if cmd.count("--resume") != 1:
            raise SystemExit(f"studio browser check: the resumed command has --resume {cmd.count('--resume')} times")
        shown = float(st.split(" s a step")[0].rsplit(" ", 1)[-1])
        if first and shown < 0.3 * first:
            raise SystemExit(f"studio browser check: {shown} s a step shown, the run's steps took about {first} s")
        print(f"  resumed: {shown:.2f} s a step shown; {first:.2f} s a step before the stop", flush=True)
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
        big_seed = "12345678901234567891"  # beyond a float's 53 bits: it must arrive exactly
        c.set_number("tune_seed", big_seed)
        c.click("tune_start")
        c.wait("each step's image and reward", lambda: c.images_in("tune_gallery") >= 1, max(300, a.timeout))
        c.wait("tuning ends", lambda: "Done" in c.text("tune_status"), max(600, a.timeout))
        c.shot("tune")
        cells = driver.find_elements(By.CSS_SELECTOR, "#tune_table [data-row][data-col='0']")
        numbers = [
            driver.execute_script("return arguments[0].textContent", td).strip()
            for td in sorted(cells, key=lambda td: int(td.get_attribute("data-row")))
        ]
        best = c.text("tune_status").split("at step ")[-1].split(".")[0]
        if numbers != [str(i) for i in range(len(numbers))] or best not in numbers:
            raise SystemExit(f"studio browser check: Tune's steps {numbers} and 'best at step {best}' disagree")
        c.click("tune_save")
        c.wait("the kept embedding is saved", lambda: "Saved" in c.text("tune_save_msg"), 60)
        from reneg.embedding import load_embedding

        saved = load_embedding(c.value("tune_save_path")).metadata.get("seed")
        if str(saved) != big_seed:
            raise SystemExit(f"studio browser check: seed {big_seed} was typed, the tuned file says {saved}")

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
            fits = [
                driver.execute_script("return getComputedStyle(arguments[0]).objectFit", i)
                for i in driver.find_elements(By.CSS_SELECTOR, "#compare_plots img")
            ]
            if not fits or any(f != "contain" for f in fits):
                raise SystemExit(f"studio browser check: Compare's plots are not shown whole (object-fit {fits})")
            cut = c.cut_off("compare_plots", "img")
            if cut:
                raise SystemExit(f"studio browser check: Compare's plots are cut off by the gallery: {cut}")

        # -- Embeddings
        c.tab("Embeddings")
        c.click("emb_list")
        c.wait("the embedding files", lambda: "embedding files under" in driver.page_source, max(120, a.timeout))
        time.sleep(2)
        c.shot("embeddings")
        import re

        captions = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#emb_thumbs .caption-label")]
        if not captions or not all(re.search(r"\(\w[\w.-]*, \d+x\d+x\d+\)$", t) for t in captions):
            raise SystemExit(f"studio browser check: the thumbnails' captions lack file, family and shape: {captions}")
        cut = c.cut_off("emb_thumbs", "img, .caption-label")
        if cut:
            raise SystemExit(f"studio browser check: thumbnails or captions are cut off by the gallery: {cut}")
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


def _step_seconds(log_csv: str) -> float | None:
    """The median time of a step in a run's log.csv (rows whose ``seconds`` grew by one step)."""
    import csv

    try:
        with open(log_csv, newline="") as f:
            rows = [(int(r["step"]), float(r["seconds"])) for r in csv.DictReader(f) if r.get("seconds")]
    except (OSError, ValueError, KeyError):
        return None
    d = sorted(b[1] - a[1] for a, b in zip(rows, rows[1:]) if b[0] == a[0] + 1 and b[1] > a[1])
    return d[len(d) // 2] if d else None


def _step(status: str) -> int:
    import re

    m = re.search(r"step (\d+)", status)
    return int(m.group(1)) if m else 0


if __name__ == "__main__":
    sys.exit(main())
