"""The ``reneg`` command: inspect, convert, train, tune, eval, rewards."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _safe_text(value, limit: int = 400) -> str:
    """A file's text for the terminal: control characters (ANSI escapes, newlines, ...) shown
    escaped, never sent raw; very long values cut."""
    s = str(value)
    out = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in s)
    return out if len(out) <= limit else out[:limit] + f"... ({len(s)} characters)"


def _cmd_inspect(ns) -> int:
    from .backends.single_file import looks_like_checkpoint

    if os.path.isfile(ns.file) and looks_like_checkpoint(ns.file):
        return _inspect_checkpoint(ns)
    from .embedding import load_embedding

    emb = load_embedding(ns.file)
    info = emb.info()
    if ns.json:
        # strict JSON (no NaN/Infinity); json escapes control characters itself
        print(json.dumps(info, indent=2, allow_nan=False))
    else:
        print(
            f"{_safe_text(info['path'])}\n  format  {info['format']}\n  family  {info['family']}\n"
            f"  shape   {info['shape']}  {info['dtype']}"
        )
        if info["pooled_shape"]:
            print(f"  pooled  {info['pooled_shape']}")
        if info.get("mask_rows") is not None:
            print(f"  mask    {info['mask_rows']} of {info['shape'][1]} rows read ({info['mask_source']})")
        s = info["stats"]

        def g(v):
            return "n/a" if v is None else f"{v:.4g}"

        print(f"  stats   mean {g(s['mean'])}  std {g(s['std'])}  norm {g(s['norm'])}")
        for k, v in sorted(info["metadata"].items()):
            print(f"  {_safe_text(k, 80)}: {_safe_text(v)}")
    return 0


def _inspect_checkpoint(ns) -> int:
    """A model checkpoint, described from its header: no weights are loaded."""
    from .backends.single_file import describe, inspect_checkpoint

    info = inspect_checkpoint(ns.file)
    if ns.json:
        print(json.dumps(info.to_json(), indent=2))
    else:
        print("\n".join(describe(info)))
    return 0


def _cmd_convert(ns) -> int:
    from .embedding import convert
    from .families import FAMILIES

    if ns.family is not None and ns.family not in FAMILIES:
        raise ValueError(f"--family {_safe_text(ns.family, 60)}: expected one of {', '.join(FAMILIES)}")
    if os.path.exists(ns.dst) and not ns.overwrite:
        raise ValueError(f"{ns.dst}: already exists (pass --overwrite to replace it)")
    emb = convert(ns.src, ns.dst, family=ns.family, overwrite=ns.overwrite)
    print(f"wrote {ns.dst}: {emb.family} {list(emb.tensor.shape)} {str(emb.tensor.dtype).replace('torch.', '')}")
    return 0


def _cmd_rewards(ns) -> int:
    from .rewards import available

    for info in available().values():
        print(f"{info.syntax}\n    {info.help}")
    return 0


def _apply_demo(ns, kind: str) -> None:
    import torch

    from . import demo

    given = demo.refuse_demo_conflicts(ns, kind)
    out = ns.out or os.path.join("runs", f"demo-{kind}")
    d = demo.setup(out if kind == "train" else os.path.dirname(os.path.abspath(out)) or ".")
    print(f"reneg {kind} --demo: {d['kind']} ({d['model']})", flush=True)
    torch.set_num_threads(demo.default_threads())
    ns.model, ns.rewards = d["model"], [d["reward"]]
    s = d["settings"]
    if kind == "train":
        ns.out, ns.prompts, ns.heldout = out, d["prompts"], d["heldout"]
        if "handcrafted" not in given:
            ns.handcrafted = d["handcrafted"]
        for k, v in s.items():
            if k not in given:
                setattr(ns, k, v)
        ns.base_model_name = "reneg-demo"
    else:
        if "prompt" not in given:
            ns.prompt = d["heldout_texts"][0]
        for k in ("resolution", "sampling_steps", "guidance", "grad_range"):
            if k not in given:
                setattr(ns, k, s[k])
        if "lr" not in given:
            ns.lr = s.get("tune_lr", s["lr"])
    overridden = sorted(k for k in given if k not in ("demo", "out", "progress", "command"))
    if overridden:
        from .options import flag_of

        print(
            f"reneg {kind} --demo: using your {', '.join(flag_of(k) for k in overridden)} instead of the demo's",
            flush=True,
        )


def _cmd_train(ns) -> int:
    from reneg.trainer.config import config_from_args
    from reneg.trainer.train import TrainingStopped, run_train

    if ns.demo:
        _apply_demo(ns, "train")
    try:
        # the command, not the library, listens for SIGTERM and Ctrl-C: the run stops after its step
        summary = run_train(config_from_args(ns), handle_signals=True)
    except TrainingStopped as e:
        print(
            f"stopped at step {e.step} of {e.steps}: {e.checkpoint} holds the run; the same command "
            f"with --resume continues it (exit status {e.exit_code}: not finished)",
            flush=True,
        )
        return e.exit_code
    if summary:
        h = summary["heldout"]
        print(
            f"held-out mean reward ({summary['heldout_prompts']} prompts): null {h['null']:.5f}  "
            f"handcrafted {h['handcrafted']:.5f}  learned {h['learned']:.5f}"
        )
        print(f"wrote {summary['embedding']} and {os.path.join(os.path.dirname(summary['embedding']), 'summary.json')}")
    return 0


def _cmd_tune(ns) -> int:
    from reneg.trainer.tune import run_tune

    if ns.demo:
        if not ns.out:  # the demo's own file is replaced each time; an --out you name is yours
            ns.out = os.path.join("runs", "demo-tune", "tuned.safetensors")
            os.makedirs(os.path.dirname(os.path.abspath(ns.out)), exist_ok=True)
            ns.overwrite = True
        _apply_demo(ns, "tune")
    ns.out = ns.out or "tuned.safetensors"
    rep = run_tune(ns)
    print(
        f"start reward {rep['start_reward']:.5f} -> best {rep['best_reward']:.5f} at step {rep['best_step']} "
        f"({rep['stopped']}); wrote {rep['embedding']}"
    )
    return 0


def _cmd_studio(ns) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise RuntimeError("the studio needs gradio: pip install 'reneg[studio]'") from None
    from .studio.app import launch

    launch(demo=ns.demo, listen=ns.listen, port=ns.port, root=ns.root)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="reneg", description="Learned negative embeddings for classifier-free guidance (ReNeg)."
    )
    p.add_argument("--version", action="version", version=f"reneg {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "inspect",
        help="describe an embedding file (family, shape, metadata) or a model "
        "checkpoint (architecture, prediction type, dtype, VAE inside?)",
    )
    s.add_argument("file")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_inspect)

    s = sub.add_parser("convert", help="convert an embedding file to ReNeg's .safetensors format")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--family", help="sd1, sd2, sdxl, pixart, tiny (default: from the shape)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_cmd_convert)

    s = sub.add_parser("rewards", help="list the reward models and their spec syntax")
    s.set_defaults(fn=_cmd_rewards)

    from reneg.trainer.config import add_train_args
    from reneg.trainer.tune import add_tune_args

    s = sub.add_parser("train", help="learn a global negative embedding")
    add_train_args(s)
    s.set_defaults(fn=_cmd_train)
    s = sub.add_parser("tune", help="per-sample search for one prompt (Algorithm 1)")
    add_tune_args(s)
    s.set_defaults(fn=_cmd_tune)

    s = sub.add_parser("studio", help="a local web app to train, watch, tune and compare (needs reneg[studio])")
    s.add_argument("--demo", action="store_true", help="open on the built-in demo world, everything filled in")
    s.add_argument(
        "--listen",
        action="store_true",
        help="serve on all network interfaces instead of 127.0.0.1 only (anyone who can reach the "
        "port can start runs and read files)",
    )
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--root", default="runs", help="folder for new runs and the Embeddings tab (default: runs)")
    s.set_defaults(fn=_cmd_studio)

    try:
        from .evaluation.cli import add_eval_parser
    except ImportError:
        add_eval_parser = None
    if add_eval_parser is not None:
        add_eval_parser(sub)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is (like Ctrl-C's KeyboardInterrupt): every write is atomic,
    so what a command stopped this way leaves is whole."""

    signum = 15


def _on_sigterm(signum, frame):
    raise Terminated()


# commands that run models for a while: SIGTERM stops them within moments, with exit status 143
_STOPPABLE = ("train", "tune", "eval")


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    p = build_parser()
    ns = p.parse_args(argv)
    old = None
    if (
        ns.command in _STOPPABLE
        and hasattr(signal, "SIGTERM")
        and threading.current_thread() is threading.main_thread()
    ):
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if getattr(ns, "demo", False):
            from .options import given_flags

            ns.given_flags = given_flags(p, sys.argv[1:] if argv is None else list(argv))
        return ns.fn(ns) or 0
    except KeyboardInterrupt as e:
        sig = getattr(e, "signum", 2)
        print("reneg: stopped (SIGTERM)" if sig == 15 else "reneg: interrupted", file=sys.stderr)
        return 128 + sig
    except RuntimeError as e:
        code = getattr(e, "exit_code", None)  # reneg.trainer.train.TrainingStopped: a stop, not an error
        if not isinstance(code, int):
            print(f"reneg {ns.command}: error: {_safe_text(str(e).strip(), 1000)}", file=sys.stderr)
            return 2
        print(f"reneg {ns.command}: {_safe_text(str(e).strip(), 1000)}", file=sys.stderr)
        return code
    except (ValueError, OSError) as e:
        # every expected failure carries a message naming the file or flag
        # one line, with a file's control characters shown escaped, never sent to the terminal raw
        print(f"reneg {ns.command}: error: {_safe_text(str(e).strip(), 1000)}", file=sys.stderr)
        return 2
    finally:
        if old is not None:
            # the process's own command line (argv None): it is exiting with the status just returned, and a
            # late SIGTERM (a second Stop) must not replace it; a caller in Python gets its handler back
            signal.signal(signal.SIGTERM, signal.SIG_IGN if argv is None else old)


if __name__ == "__main__":
    sys.exit(main())
