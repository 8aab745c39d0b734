"""Training and evaluation runs as child processes, and what their output folders say.

Nothing here imports gradio: the page (:mod:`reneg.studio.app`) and the tests call these functions.
A run is ``python -m reneg.cli train ...`` started in its own session, its output going to
``OUT/studio_train.log``; ``OUT/studio_run.json`` records the command and process id, so a page
opened later, or a restarted app, finds the run again from its folder alone.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from itertools import pairwise

from .forms import (  # noqa: F401 - the forms' names, also reached through this module
    EVAL_LABELS,
    EVAL_NAMES,
    TRAIN,
    TRAIN_LABELS,
    TRAIN_NAMES,
    TUNE_LABELS,
    TUNE_NAMES,
    EvalForm,
    FormError,
    TrainForm,
    _command_parser,
    _lines,
    parts_text,
    _text,
    check_eval,
    check_train,
    demo_setup,
    eval_args,
    name_fields,
    real,
    short_label,
    train_args,
    whole,
)

RUN_FILE = "studio_run.json"
TRAIN_LOG = "studio_train.log"
EVAL_LOG = "studio_eval.log"


# --------------------------------------------------------------------------- a run's own settings

# flags of ``reneg train`` the form has no field for, carried in ``TrainForm.extra`` when a run used them
_EXTRA_FLAGS = (
    ("heldout_seed", "--heldout-seed"),
    ("lr_schedule", "--lr-schedule"),
    ("weight_decay", "--weight-decay"),
    ("warmup", "--warmup"),
    ("rollout_steps", "--rollout-steps"),
    ("grads_per_rollout", "--grads-per-rollout"),
    ("max_bad_steps", "--max-bad-steps"),
    ("prediction_type", "--prediction-type"),
    # what else a resumed run must match (trainer.config.RESUME_MUST_MATCH) that the form has no field for
    ("guidance_2", "--guidance-2"),
    ("wan_experts", "--wan-experts"),
    ("nag_scale", "--nag-scale"),
    ("nag_tau", "--nag-tau"),
    ("nag_alpha", "--nag-alpha"),
    ("predictor", "--predictor"),
    ("predictor_rank", "--predictor-rank"),
    ("predictor_reg", "--predictor-reg"),
    ("predictor_features", "--predictor-features"),
    ("tokens", "--tokens"),
)


def form_from_config(cfg: dict, out: str) -> TrainForm:
    """The form for a trainer config (a checkpoint's or summary.json's ``config``)."""
    from reneg.trainer.config import TrainConfig

    d = TrainConfig()

    def g(k):
        v = cfg.get(k)
        return getattr(d, k) if v is None else v

    grad = cfg.get("grad_range") or list(d.grad_range)
    extra = [f"{flag}={cfg[k]}" for k, flag in _EXTRA_FLAGS if cfg.get(k) is not None and cfg[k] != getattr(d, k)]
    extra += [
        f"--{k.replace('_', '-')}"
        for k in ("gradient_checkpointing", "offload_text_encoder", "channels_last")
        if cfg.get(k) is True
    ]
    mode = cfg.get("guidance_mode") or "cfg"
    if mode != "cfg":  # after the form's CFG scale, so that it sets the mode: nag or SCALE+nag
        extra.append("--guidance=nag" if mode == "nag" else f"--guidance={float(g('guidance'))!r}+nag")
    return TrainForm(
        model=cfg.get("model") or "",
        config=cfg.get("config") or "",
        parts=parts_text(cfg),  # --text-encoder, --vae, --tokenizer, --low-noise-model
        rewards="\n".join(cfg.get("rewards") or []),
        monitor_rewards="\n".join(cfg.get("monitor_rewards") or []),
        prompts=cfg.get("prompts") or "",
        heldout=cfg.get("heldout") or "",
        handcrafted=g("handcrafted"),
        out=out,
        steps=g("steps"),  # as run: the options a --recipe filled come back as their own flags (extra)
        lr=g("lr"),
        batch_size=g("batch_size"),
        micro_batch=g("micro_batch"),
        sampling_steps=g("sampling_steps"),
        guidance=g("guidance"),
        grad_lo=grad[0],
        grad_hi=grad[1],
        resolution=g("resolution"),
        frames=g("frames"),
        shift="" if cfg.get("shift") is None else repr(float(cfg["shift"])),
        init=g("init"),
        seed=g("seed"),
        heldout_count=g("heldout_count"),
        checkpoint_every=g("checkpoint_every"),
        eval_every=g("eval_every"),
        eval_batch=g("eval_batch"),
        sample_every=g("sample_every"),
        mixed_precision=g("mixed_precision"),
        device=cfg.get("device") or "",
        report_to=g("report_to"),
        keep_best_by=cfg.get("keep_best_by") or "",
        extra=extra,
    )


def recorded_form(out: str) -> TrainForm | None:
    """The settings of the run in ``out``: the form the studio started it with (``studio_run.json``),
    else the trainer's config in its checkpoint or ``summary.json``; None when there is no run."""
    out = _text(out)
    if not out or not os.path.isdir(out):
        return None
    form = read_run_file(out).get("form")
    if isinstance(form, dict):
        try:
            f = TrainForm(**{k: v for k, v in form.items() if k in TrainForm.__dataclass_fields__})
            f.out = out
            f.extra = [str(x) for x in (f.extra or [])]
            return f
        except TypeError:
            pass
    cfg = None
    if os.path.isfile(os.path.join(out, "checkpoint.pt")):
        try:
            from reneg.trainer.checkpoint import load_checkpoint

            cfg = load_checkpoint(os.path.join(out, "checkpoint.pt"))["config"]
        except (OSError, ValueError, RuntimeError):
            cfg = None
    if not cfg:
        try:
            with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
                cfg = json.load(fh).get("config")
        except (OSError, ValueError, AttributeError):
            cfg = None
    return form_from_config(cfg, out) if isinstance(cfg, dict) and cfg else None


def _same(k: str, a, b) -> bool:
    try:
        if isinstance(getattr(TrainForm(), k), int) and k != "extra":
            return whole(k, a) == whole(k, b)
        if isinstance(getattr(TrainForm(), k), float):
            return real(k, a) == real(k, b)
    except FormError:
        return False
    return _text(a) == _text(b) if not isinstance(a, list) else list(a) == list(b)


def resume_form(page: TrainForm) -> tuple[TrainForm, list[str]]:
    """What Resume runs: the settings the run in the page's output folder was made with (a resumed
    run is the interrupted one), and the names of the page's fields that differed from them."""
    rec = recorded_form(page.out)
    if rec is None:
        return page, []
    differ = [
        short_label(TRAIN_LABELS[k])
        for k in TRAIN_LABELS
        if k != "out" and not _same(k, getattr(page, k), getattr(rec, k))
    ]
    rec.out = _text(page.out)
    return rec, differ


# --------------------------------------------------------------------------- processes


def _python_cmd(sub: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "reneg.cli", sub, *args]


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    cmdline = f"/proc/{pid}/cmdline"
    if os.path.isfile(cmdline):  # a reused pid is some other program
        try:
            with open(cmdline, "rb") as f:
                text = f.read().replace(b"\0", b" ")
            if b"reneg" not in text:
                return False
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().rsplit(b")", 1)[-1].split()
            if stat and stat[0] == b"Z":
                return False
        except OSError:
            return False
    return True


def read_run_file(out: str) -> dict:
    try:
        with open(os.path.join(out, RUN_FILE), encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


class RunManager:
    """The training processes this app started, and any found from their folders."""

    def __init__(self, env: dict | None = None):
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(env or {})
        self.last_out: str | None = None

    def _key(self, out: str) -> str:
        return os.path.abspath(out)

    def is_running(self, out: str) -> bool:
        p = self.procs.get(self._key(out))
        if p is not None:
            return p.poll() is None
        return _alive(read_run_file(out).get("pid"))

    def start(self, form: TrainForm, resume: bool = False) -> str:
        """Start (or resume) a run; returns a line for the page. Raises FormError on a bad form."""
        out = form.out.strip()
        if out and self.is_running(out):
            raise FormError(
                f"Output folder {out}: a run is already going there (Stop it first, or pick another folder)"
            )
        if resume and not os.path.isfile(os.path.join(out, "checkpoint.pt")):
            raise FormError(f"Resume: {os.path.join(out, 'checkpoint.pt')} does not exist yet; press Start")
        if not resume and os.path.isfile(os.path.join(out, "checkpoint.pt")):
            raise FormError(
                f"Output folder {out} already holds a run (checkpoint.pt): press Resume to "
                f"continue it, or choose another output folder"
            )
        args = check_train(form, resume=resume)  # with --resume=latest when resuming
        cmd = _python_cmd("train", args + ["--no-progress"])
        resume_step = _checkpoint_step(out) if resume else 0
        os.makedirs(out, exist_ok=True)
        from reneg.fileio import atomic_write_json

        try:
            os.unlink(os.path.join(out, "STOP"))
        except OSError:
            pass
        log_path = os.path.join(out, TRAIN_LOG)
        log = open(log_path, "a" if resume else "w", encoding="utf-8")  # noqa: SIM115 - the child's output
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        try:
            p = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, **_detach()
            )
        finally:
            log.close()
        self.procs[self._key(out)] = p
        self.last_out = out
        atomic_write_json(
            os.path.join(out, RUN_FILE),
            {
                "pid": p.pid,
                "command": cmd,
                "args": args,
                "form": asdict(form),
                "steps": whole(TRAIN_LABELS["steps"], form.steps),
                "started": time.time(),
                "resume": resume,
                "resume_step": resume_step,  # where this process began: its time per step counts from here
                "log": TRAIN_LOG,
            },
        )
        return (
            f"{'Resumed' if resume else 'Started'} `reneg train` (process {p.pid}) into {out}; "
            f"it goes on if this page is closed"
        )

    def stop(self, out: str) -> str:
        """Ask the run to stop after its current step with a checkpoint (OUT/STOP and SIGTERM)."""
        out = out.strip()
        if not self.is_running(out):
            return f"No run is going in {out}"
        if os.path.exists(os.path.join(out, "STOP")):  # pressed again: the stop is under way, ask only once
            return f"Already stopping the run in {out} after its current step (a checkpoint is written)"
        with open(os.path.join(out, "STOP"), "w", encoding="utf-8") as f:
            f.write("stop requested by reneg studio\n")
        p = self.procs.get(self._key(out))
        pid = p.pid if p is not None else read_run_file(out).get("pid")
        if pid and hasattr(signal, "SIGTERM") and os.name != "nt":
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        return f"Stopping the run in {out} after its current step (a checkpoint is written)"

    def wait(self, out: str, timeout: float | None = None) -> int | None:
        p = self.procs.get(self._key(out))
        if p is None:
            return None
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def returncode(self, out: str) -> int | None:
        p = self.procs.get(self._key(out))
        return None if p is None else p.poll()

    def shutdown(self) -> None:
        """Leave runs going (they are detached); reap finished children."""
        for p in self.procs.values():
            p.poll()


def _detach() -> dict:
    if os.name == "nt":
        return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
    return {"start_new_session": True}


# --------------------------------------------------------------------------- a run's folder


def read_log(out: str) -> list[dict]:
    path = os.path.join(out, "log.csv")
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                try:
                    row = {"step": int(r["step"])}
                except (KeyError, TypeError, ValueError):
                    continue  # a line being written
                for k, v in r.items():
                    if k != "step" and v not in (None, ""):
                        try:
                            row[k] = float(v)
                        except ValueError:
                            pass
                rows.append(row)
    except OSError:
        pass
    return rows


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.rstrip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def error_line(log_text: str) -> str | None:
    """The readable error a failed run printed (``reneg train: error: ...``), or its last traceback line."""
    lines = log_text.splitlines()
    for ln in reversed(lines):
        if ": error:" in ln:
            return ln.strip()
    for ln in reversed(lines):
        if ln and not ln.startswith(" ") and ("Error" in ln or "Exception" in ln):
            return ln.strip()
    return None


def seconds_per_step(rows: list[dict], since: int | None = None) -> float | None:
    """Median time of the recent steps of the process now training, from one row's ``seconds`` to the
    next. ``seconds`` restarts when a run is resumed, so only rows after ``since``, the step that
    process began from, are used (without it: the rows after the last restart). A process's first row
    gives no time: it counts from after the sample images made at its start, the later ones include
    them."""
    if since is None:
        since = 0
        for a, b in pairwise(rows):
            if "seconds" in a and "seconds" in b and b["seconds"] <= a["seconds"]:
                since = a["step"]
    d, prev = [], None
    for r in rows:
        if r["step"] <= since or "seconds" not in r:
            continue
        if prev is not None and r["step"] == prev["step"] + 1 and r["seconds"] > prev["seconds"]:
            d.append(r["seconds"] - prev["seconds"])
        prev = r
    d = d[-10:]
    if not d:
        return None
    return sorted(d)[len(d) // 2]


def fmt_duration(s: float) -> str:
    s = round(s)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def sample_files(out: str) -> list[tuple[int, str]]:
    folder = os.path.join(out, "samples")
    found = []
    try:
        for fn in os.listdir(folder):
            if fn.startswith("step_") and fn.endswith(".png"):
                try:
                    found.append((int(fn[5:-4]), os.path.join(folder, fn)))
                except ValueError:
                    pass
    except OSError:
        pass
    return sorted(found)


def _checkpoint_step(out: str) -> int | None:
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(path):
        return None
    try:
        from reneg.trainer.checkpoint import load_checkpoint

        return int(load_checkpoint(path)["step"])
    except (OSError, ValueError, RuntimeError):
        return None


def run_status(out: str, manager: RunManager | None = None) -> dict:
    """Everything the page shows about the run in ``out``, read from its files."""
    out = (out or "").strip()
    st = {
        "out": out,
        "state": "empty",
        "message": "",
        "step": 0,
        "steps": None,
        "eta": None,
        "rows": [],
        "heldout": [],
        "samples": [],
        "log": "",
        "summary": None,
        "running": False,
        "monitors": {},  # {series: [(step, value)]}: the monitor rewards' and the diversity's held-out points
        "warnings": [],  # the run's reward-hacking warnings (summary.json), as the trainer printed them
    }
    if not out or not os.path.isdir(out):
        st["message"] = f"No run in {out or '(no folder)'} yet: fill in the form and press Start"
        return st
    run = read_run_file(out)
    rows = read_log(out)
    st["rows"] = rows
    st["samples"] = sample_files(out)
    st["log"] = _tail(os.path.join(out, TRAIN_LOG))
    summary = None
    try:
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        pass
    steps = run.get("steps") or (summary or {}).get("steps")
    st["steps"] = steps
    st["step"] = rows[-1]["step"] if rows else 0
    # the held-out table (and the plot's points): null / handcrafted / learned as each is scored, once a step
    scored = {}
    for r in rows:
        if "heldout_learned" in r:
            scored[r["step"]] = [r["step"], r.get("heldout_null"), r.get("heldout_handcrafted"), r["heldout_learned"]]
    running = manager.is_running(out) if manager is not None else _alive(run.get("pid"))
    st["running"] = running
    started = float(run.get("started", 0) or 0)
    fresh = summary is not None and (not run or os.path.getmtime(os.path.join(out, "summary.json")) >= started)
    status = (summary or {}).get("status", "finished") if fresh else None  # finished | stopped | running
    if fresh and not running and isinstance(summary, dict) and status == "finished":
        st["summary"] = summary
        # the final score is in summary.json (a log written before it was may lack it)
        history = summary.get("heldout_history")
        for h in (history if isinstance(history, list) else []) + [
            dict(summary.get("heldout") or {}, step=summary.get("steps"))
        ]:
            if isinstance(h, dict) and isinstance(h.get("step"), int) and h.get("learned") is not None:
                scored.setdefault(h["step"], [h["step"], h.get("null"), h.get("handcrafted"), h["learned"]])
    st["heldout"] = [scored[k] for k in sorted(scored)]
    st["monitors"] = monitor_points(rows, (st["summary"] or {}).get("heldout_history"))
    if fresh and isinstance(summary, dict) and isinstance(summary.get("warnings"), list):
        st["warnings"] = [w["message"] for w in summary["warnings"] if isinstance(w, dict) and w.get("message")]
    # this process's own steps: after a resume, the ones after the step it resumed from
    since = (run.get("resume_step") or 0) if run and (not run.get("resume") or "resume_step" in run) else None
    sps = seconds_per_step(rows, since)
    if running:
        log_csv = os.path.join(out, "log.csv")
        if not rows or os.path.getmtime(log_csv) < started:  # not yet (re)opened
            st["state"] = "loading"
            if run.get("resume"):
                st["message"] = (
                    f"Resuming from step {run.get('resume_step') or _checkpoint_step(out)}: loading the models..."
                )
            elif any(os.path.getmtime(p) >= started for _, p in st["samples"] if os.path.exists(p)):
                st["message"] = "Training the first step..."
            else:
                st["message"] = "Loading the models..."
        else:
            st["state"] = "running"
            msg = f"Running: step {st['step']} of {steps}"
            if sps and steps:
                st["eta"] = sps * max(0, steps - st["step"])
                msg += f", {sps:.2f} s a step, about {fmt_duration(st['eta'])} left"
            elif run.get("resume") and since is not None:
                msg += f" (resumed from step {since}; measuring its time per step)"
            if os.path.exists(os.path.join(out, "STOP")):
                msg += " (stopping after this step)"
            st["message"] = msg
        return st
    rc = manager.returncode(out) if manager is not None else None
    ck = _checkpoint_step(out)
    if st["summary"] is not None:
        h = st["summary"].get("heldout", {})
        st["state"] = "finished"
        st["message"] = (
            f"Finished {st['summary'].get('steps')} steps. Held-out mean reward: null "
            f"{_f(h.get('null'))}, handcrafted {_f(h.get('handcrafted'))}, learned "
            f"{_f(h.get('learned'))}. Embedding: {st['summary'].get('embedding')}"
        )
        best = st["summary"].get("best")
        if isinstance(best, dict) and best.get("step") is not None:
            st["message"] += (
                f". Best held-out {best.get('by')}: {_f(best.get('value'))} at step {best['step']} "
                f"({best.get('embedding')})"
            )
    elif ck is not None and (status == "stopped" or ("stopped on request" in st["log"] and rc in (None, 0, 130, 143))):
        st["state"] = "stopped"
        st["message"] = f"Stopped at step {ck} with a checkpoint; press Resume to continue"
    elif os.path.exists(os.path.join(out, "STOP")):  # stopped while loading: there was nothing to keep
        st["state"] = "stopped"
        st["message"] = (
            f"Stopped at step {ck}; press Resume to continue"
            if ck is not None
            else "Stopped before its first step; press Start to begin again"
        )
    elif run:
        err = error_line(st["log"])
        st["state"] = "failed"
        st["message"] = (
            f"The run ended without finishing: {err}" if err else "The run ended without finishing (see the log below)"
        )
        if ck is not None:
            st["message"] += f". Its last checkpoint is step {ck}: Resume continues from there"
    else:
        st["state"] = "idle"
        st["message"] = (
            f"A run folder without a studio record: step {st['step']}"
            if rows
            else f"No run in {out} yet: fill in the form and press Start"
        )
    return st


def _f(x) -> str:
    return "-" if x is None else f"{float(x):.4f}"


def monitor_points(rows: list[dict], history: list | None = None) -> dict:
    """The learned negative's held-out points besides the training reward's, by series: each monitor
    reward (``heldout_NAME_learned`` in log.csv, ``NAME_learned`` in summary.json's ``heldout_history``)
    and ``diversity``; ``{series: [(step, value)]}`` sorted by step, each step once."""
    found: dict = {}

    def add(name, step, v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            found.setdefault(name, {}).setdefault(step, float(v))

    for r in rows:
        for k, v in r.items():
            if k == "heldout_diversity":
                add("diversity", r["step"], v)
            elif k.startswith("heldout_") and k.endswith("_learned") and k != "heldout_learned":
                add(k[len("heldout_") : -len("_learned")], r["step"], v)
    for h in history if isinstance(history, list) else []:
        if not isinstance(h, dict) or not isinstance(h.get("step"), int):
            continue
        for k, v in h.items():
            if k == "diversity" or (k.endswith("_learned") and k != "learned"):
                add(k if k == "diversity" else k[: -len("_learned")], h["step"], v)
    return {name: sorted(pts.items()) for name, pts in found.items()}


def start_eval(form: EvalForm, threads: int | None = None) -> subprocess.Popen:
    args = check_eval(form)
    out = _text(form.out)
    os.makedirs(out, exist_ok=True)
    cmd = _python_cmd("eval", args + ["--no-progress"] + (["--threads", str(threads)] if threads else []))
    log = open(os.path.join(out, EVAL_LOG), "w", encoding="utf-8")  # noqa: SIM115 - the child's output
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    try:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            **_detach(),
        )
    finally:
        log.close()


def eval_report(out: str) -> dict:
    """The report ``reneg eval`` wrote: the table rows, the grid and the plots."""
    rep = {"table": [], "headers": [], "grid": None, "plots": [], "markdown": ""}
    try:
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return rep
    ref = summary.get("reference")
    rep["headers"] = ["reward", "negative", "mean", "95% CI", f"win rate vs {ref}"]
    for rw in summary.get("rewards", []):
        rw = rw.get("name") if isinstance(rw, dict) else rw  # reward entries (name, role); names before that
        for n in summary.get("negatives", []):
            name = n["name"] if isinstance(n, dict) else n
            ci = summary.get("means", {}).get(rw, {}).get(name, {}).get("all", {})
            wr = ""
            if name != ref:
                w = summary.get("win_rates", {}).get(rw, {}).get(name, {}).get(ref)
                if w:
                    wr = f"{w['rate']:.2f} ({w['wins']}/{w['ties']}/{w['losses']})"
            lo, hi = ci.get("lo"), ci.get("hi")
            rep["table"].append(
                [rw, name, _f(ci.get("mean")), f"[{lo:.4f}, {hi:.4f}]" if lo is not None and hi is not None else "", wr]
            )
    grid = os.path.join(out, "grid.png")
    rep["grid"] = grid if os.path.isfile(grid) else None
    rep["plots"] = [
        os.path.join(out, "plots", p)
        for p in ("means.png", "differences.png", "winrates.png", "categories.png")
        if os.path.isfile(os.path.join(out, "plots", p))
    ]
    try:
        with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
            rep["markdown"] = f.read()
    except OSError:
        pass
    return rep
