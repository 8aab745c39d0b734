"""Training and evaluation runs as child processes, and what their output folders say.

Nothing here imports gradio: the page (:mod:`reneg.studio.app`) and the tests call these functions.
A run is ``python -m reneg.cli train ...`` started in its own session, its output going to
``OUT/studio_train.log``; ``OUT/studio_run.json`` records the command and process id, so a page
opened later, or a restarted app, finds the run again from its folder alone.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import pairwise

RUN_FILE = "studio_run.json"
TRAIN_LOG = "studio_train.log"
EVAL_LOG = "studio_eval.log"


class FormError(ValueError):
    """A bad value in the page's form: the message is shown in the page as it is."""


# --------------------------------------------------------------------------- the Train form


@dataclass
class TrainForm:
    """The Train tab's fields; the defaults are ``reneg train``'s own."""

    model: str = ""
    config: str = ""
    rewards: str = ""  # one NAME=PATH[,...] spec a line
    prompts: str = ""
    heldout: str = ""
    handcrafted: str = ""
    out: str = "runs/studio"
    steps: int = 4000
    lr: float = 5e-3
    batch_size: int = 64
    micro_batch: int = 1
    sampling_steps: int = 30
    guidance: float = 7.5
    grad_lo: int = 0
    grad_hi: int = 10
    resolution: int = 512
    init: str = "null"
    seed: int = 0
    heldout_count: int = 16
    checkpoint_every: int = 100
    eval_every: int = 500
    eval_batch: int = 4
    sample_every: int = 100
    mixed_precision: str = "no"
    device: str = ""
    report_to: str = "none"
    extra: list[str] = field(default_factory=list)  # more reneg train flags, as given

    @classmethod
    def defaults(cls) -> TrainForm:
        from reneg.trainer.config import TrainConfig

        d = TrainConfig()
        return cls(
            steps=d.steps,
            lr=d.lr,
            batch_size=d.batch_size,
            micro_batch=d.micro_batch,
            sampling_steps=d.sampling_steps,
            guidance=d.guidance,
            grad_lo=d.grad_range[0],
            grad_hi=d.grad_range[1],
            resolution=d.resolution,
            init=d.init,
            seed=d.seed,
            heldout_count=d.heldout_count,
            checkpoint_every=d.checkpoint_every,
            eval_every=d.eval_every,
            eval_batch=d.eval_batch,
            handcrafted=d.handcrafted,
            mixed_precision=d.mixed_precision,
        )


def demo_setup(root: str = "runs") -> dict:
    """The demo world's files (written under ``ROOT/studio-demo/demo``) and the forms filled for it."""
    from reneg import demo

    out = os.path.join(root, "studio-demo")
    d = demo.setup(out)
    s = d["settings"]
    train = TrainForm(
        model=d["model"],
        rewards=d["reward"],
        prompts=d["prompts"],
        heldout=d["heldout"],
        handcrafted=d["handcrafted"],
        out=out,
        steps=s["steps"],
        lr=s["lr"],
        batch_size=s["batch_size"],
        micro_batch=s["micro_batch"],
        sampling_steps=s["sampling_steps"],
        guidance=s["guidance"],
        grad_lo=s["grad_range"][0],
        grad_hi=s["grad_range"][1],
        resolution=s["resolution"],
        seed=0,
        heldout_count=s.get("heldout_count", 16),
        checkpoint_every=s["checkpoint_every"],
        eval_every=s["eval_every"],
        eval_batch=s["eval_batch"],
        sample_every=max(1, s["steps"] // 16),
    )
    heldout = d["heldout_texts"]
    return {
        "kind": d["kind"],
        "train": train,
        "prompt": heldout[0] if heldout else "a red circle",
        "tune_lr": s.get("tune_lr", s["lr"]),
        "threads": demo.default_threads(),
        "root": root,
    }


def train_args(form: TrainForm) -> list[str]:
    """``reneg train`` arguments for a filled form (no validation)."""
    a = ["--model", form.model.strip()]
    if form.config.strip():
        a += ["--config", form.config.strip()]
    for spec in _lines(form.rewards):
        a += ["--reward", spec]
    a += ["--prompts", form.prompts.strip()]
    if form.heldout.strip():
        a += ["--heldout", form.heldout.strip()]
    if form.handcrafted.strip():
        a += ["--handcrafted", form.handcrafted.strip()]
    a += [
        "--out",
        form.out.strip(),
        "--steps",
        _int(form.steps),
        "--lr",
        repr(float(form.lr)),
        "--batch-size",
        _int(form.batch_size),
        "--micro-batch",
        _int(form.micro_batch),
        "--sampling-steps",
        _int(form.sampling_steps),
        "--guidance",
        repr(float(form.guidance)),
        "--grad-range",
        _int(form.grad_lo),
        _int(form.grad_hi),
        "--resolution",
        _int(form.resolution),
        "--init",
        form.init.strip() or "null",
        "--seed",
        _int(form.seed),
        "--heldout-count",
        _int(form.heldout_count),
        "--checkpoint-every",
        _int(form.checkpoint_every),
        "--eval-every",
        _int(form.eval_every),
        "--eval-batch",
        _int(form.eval_batch),
        "--sample-every",
        _int(form.sample_every),
        "--mixed-precision",
        form.mixed_precision or "no",
        "--report-to",
        form.report_to or "none",
    ]
    if form.device.strip():
        a += ["--device", form.device.strip()]
    return a + list(form.extra)


def _lines(text: str) -> list[str]:
    return [s.strip() for s in (text or "").splitlines() if s.strip()]


def _int(v) -> str:
    if v is None or v == "":
        raise FormError("a number field is empty")
    f = float(v)
    if f != int(f):
        raise FormError(f"expected a whole number, got {v}")
    return str(int(f))


def _command_parser(kind: str):
    """``reneg train`` / ``reneg eval``'s own argument parser, exactly as the command line builds it
    (the same functions add the flags), so a form is checked as the command would check it."""
    import argparse

    p = argparse.ArgumentParser(prog="reneg")
    sub = p.add_subparsers(dest="command", required=True)
    if kind == "train":
        from reneg.trainer.config import add_train_args

        add_train_args(sub.add_parser("train"))
    else:
        from reneg.evaluation.cli import add_eval_parser

        add_eval_parser(sub)
    return p


def check_train(form: TrainForm, resume: bool = False) -> list[str]:
    """The arguments, checked exactly as ``reneg train`` checks them (no model loads): a bad form
    raises :class:`FormError` with the trainer's one-line message."""
    from reneg.trainer.config import ConfigError, config_from_args, validate_train
    from reneg.trainer.events import check_event_args

    if not form.out.strip():
        raise FormError("Output folder: required")
    args = train_args(form) + (["--resume", "latest"] if resume else [])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = _command_parser("train").parse_args(["train", *args])
    except SystemExit:
        msg = err.getvalue().strip().splitlines()
        raise FormError(msg[-1].replace("reneg train: error: ", "") if msg else "bad arguments") from None
    try:
        cfg = config_from_args(ns)
        validate_train(cfg)
        check_event_args(cfg)
    except ConfigError as e:
        raise FormError(str(e)) from None
    except (OSError, ValueError) as e:
        raise FormError(str(e)) from None
    return args


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
        args = check_train(form, resume=resume)
        cmd = _python_cmd("train", args + ["--no-progress"] + (["--resume", "latest"] if resume else []))
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
                "steps": int(float(form.steps)),
                "started": time.time(),
                "resume": resume,
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


def seconds_per_step(rows: list[dict]) -> float | None:
    """Median time of the recent steps (``seconds`` restarts at 0 when a run is resumed)."""
    d = []
    for a, b in pairwise(rows):
        if "seconds" in a and "seconds" in b and b["step"] == a["step"] + 1 and b["seconds"] > a["seconds"]:
            d.append(b["seconds"] - a["seconds"])
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
    # the held-out table: null / handcrafted / learned as each is scored
    for r in rows:
        if "heldout_learned" in r:
            st["heldout"].append([r["step"], r.get("heldout_null"), r.get("heldout_handcrafted"), r["heldout_learned"]])
    running = manager.is_running(out) if manager is not None else _alive(run.get("pid"))
    st["running"] = running
    fresh = summary is not None and (
        not run or os.path.getmtime(os.path.join(out, "summary.json")) >= float(run.get("started", 0))
    )
    status = (summary or {}).get("status", "finished") if fresh else None  # finished | stopped | running
    if fresh and not running and status == "finished":
        st["summary"] = summary
        h = summary.get("heldout", {})
        last = [summary["steps"], h.get("null"), h.get("handcrafted"), h.get("learned")]
        if not st["heldout"] or st["heldout"][-1][0] != last[0]:
            st["heldout"].append(last)
    sps = seconds_per_step(rows)
    if running:
        log_csv = os.path.join(out, "log.csv")
        if not rows or os.path.getmtime(log_csv) < float(run.get("started", 0)):  # not yet (re)opened
            st["state"] = "loading"
            st["message"] = "Training the first step..." if st["samples"] else "Loading the models..."
        else:
            st["state"] = "running"
            msg = f"Running: step {st['step']} of {steps}"
            if sps and steps:
                st["eta"] = sps * max(0, steps - st["step"])
                msg += f", {sps:.2f} s a step, about {fmt_duration(st['eta'])} left"
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


# --------------------------------------------------------------------------- Compare (reneg eval)


@dataclass
class EvalForm:
    model: str = ""
    config: str = ""
    rewards: str = ""
    prompts: str = ""
    negatives: str = "null\nhandcrafted"
    handcrafted: str = ""
    out: str = "runs/studio-eval"
    limit: int = 0
    images_per_prompt: int = 1
    sampling_steps: int = 30
    guidance: float = 7.5
    resolution: int = 512
    batch: int = 4
    seed: int = 0
    device: str = ""


def eval_args(form: EvalForm) -> list[str]:
    a = ["--model", form.model.strip()]
    if form.config.strip():
        a += ["--config", form.config.strip()]
    for spec in _lines(form.rewards):
        a += ["--reward", spec]
    a += ["--prompts", form.prompts.strip()]
    for spec in _lines(form.negatives):
        a += ["--negative", spec]
    if form.handcrafted.strip():
        a += ["--handcrafted", form.handcrafted.strip()]
    a += [
        "--out",
        form.out.strip(),
        "--images-per-prompt",
        _int(form.images_per_prompt),
        "--sampling-steps",
        _int(form.sampling_steps),
        "--guidance",
        repr(float(form.guidance)),
        "--resolution",
        _int(form.resolution),
        "--batch",
        _int(form.batch),
        "--seed",
        _int(form.seed),
    ]
    if form.limit and int(float(form.limit)) > 0:
        a += ["--limit", _int(form.limit)]
    if form.device.strip():
        a += ["--device", form.device.strip()]
    return a


def check_eval(form: EvalForm) -> list[str]:
    """``reneg eval``'s own checks, before any model loads."""
    from reneg.trainer.config import ConfigError

    from reneg.evaluation.cli import config_from_args
    from reneg.evaluation.run import validate_eval

    if not form.out.strip():
        raise FormError("Output folder: required")
    args = eval_args(form)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = _command_parser("eval").parse_args(["eval", *args])
    except SystemExit:
        msg = err.getvalue().strip().splitlines()
        raise FormError(msg[-1].replace("reneg eval: error: ", "") if msg else "bad arguments") from None
    try:
        validate_eval(config_from_args(ns))
    except (ConfigError, OSError, ValueError) as e:
        raise FormError(str(e)) from None
    return args


def start_eval(form: EvalForm, threads: int | None = None) -> subprocess.Popen:
    args = check_eval(form)
    out = form.out.strip()
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


# --------------------------------------------------------------------------- Embeddings


def list_embeddings(folder: str) -> list[dict]:
    """The embedding files under ``folder`` with family, kind and provenance, or the load error."""
    from reneg.embedding import list_embedding_files, load_embedding

    rows = []
    for path in list_embedding_files(folder):
        if os.path.basename(path) == "checkpoint.pt":  # a training checkpoint, not an embedding
            continue
        try:
            emb = load_embedding(path)
        except (OSError, ValueError, RuntimeError) as e:
            rows.append({"path": path, "error": str(e)})
            continue
        m = emb.metadata
        rows.append(
            {
                "path": path,
                "family": emb.family,
                "kind": m.get("kind", "?" if emb.format == "reneg" else "official (no metadata)"),
                "shape": "x".join(map(str, emb.tensor.shape)),
                "format": emb.format,
                "base_model": m.get("base_model", ""),
                "steps": m.get("trained_steps", m.get("steps", "")),
                "rewards": m.get("rewards", ""),
                "created": m.get("created", ""),
                "source": m.get("source_file", m.get("prompt", "")),
                "emb": emb,
            }
        )
    return rows


def thumbnail(entry: dict, size: int = 160):
    """A picture of an embedding: its run's latest sample grid when it sits in a run folder, else a
    heat map of its values (tokens down, channels across)."""
    from PIL import Image

    folder = os.path.dirname(entry["path"])
    samples = sample_files(folder)
    if samples:
        im = Image.open(samples[-1][1]).convert("RGB")
        im.thumbnail((size * 2, size * 2))
        return im
    import numpy as np

    emb = entry.get("emb")
    if emb is None:
        return Image.new("RGB", (size, size), (200, 60, 60))
    t = emb.tensor.float()[0].numpy()
    t = (t - t.mean(0, keepdims=True)) / (np.abs(t - t.mean(0, keepdims=True)).max() + 1e-8)
    pos, neg = np.clip(t, 0, 1), np.clip(-t, 0, 1)
    rgb = (np.stack([1 - neg, 1 - pos - neg, 1 - pos], -1).clip(0, 1) * 255).astype("uint8")
    # red: above the channel's mean over tokens, blue: below
    return Image.fromarray(rgb, "RGB").resize((size, size), Image.NEAREST)
