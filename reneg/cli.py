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
    from .fileio import not_a_file

    path = ns.file
    why = not_a_file(path)
    if why:
        raise ValueError(f"{path}: {why}")
    try:
        with open(path, "rb") as f:  # an unreadable file (an I/O error) is said with its name
            f.read(8)
        return _inspect_file(ns)
    except BrokenPipeError:
        raise
    except OSError as e:
        if path in str(e):
            raise
        raise OSError(f"{path}: cannot read the file ({e.strerror or e})") from None


def _inspect_predictor(ns) -> int:
    from .predictor import predictor_info

    info = predictor_info(ns.file)
    if ns.json:
        print(json.dumps(info, indent=2, allow_nan=False))
        return 0
    g = info["global"]
    print(
        f"{_safe_text(info['path'])}\n  format  {info['format']} (a negative predictor)\n  family  {info['family']}\n"
        f"  global  {g['shape']}{'  pooled ' + str(g['pooled_shape']) if g['pooled_shape'] else ''}  norm "
        f"{g['norm']:.4g}\n  model   {info['architecture']}, rank {info['rank']}, {info['parameters']} parameters "
        f"(read-out norm {info['readout_norm']:.4g}; 0: it is its global negative)\n  reads   the prompt "
        + (
            f"centred on its training prompts' mean feature (norm {info['feature_mean_norm']:.4g})"
            if info["feature_mean_norm"]
            else "uncentred (no feature mean)"
        )
    )
    for k, v in info["metadata"].items():
        if k not in ("format", "format_version", "family", "architecture", "rank", "hidden_size", "token_count"):
            print(f"  {_safe_text(k)}: {_safe_text(str(v))[:200]}")
    return 0


def _inspect_file(ns) -> int:
    from .backends.single_file import looks_like_checkpoint

    if looks_like_checkpoint(ns.file):
        return _inspect_checkpoint(ns)
    from .predictor import is_predictor_file

    if is_predictor_file(ns.file):  # reneg train --predictor's file (reneg/predictor.py)
        return _inspect_predictor(ns)
    from .embedding import EmbeddingError, load_embedding

    try:
        emb = load_embedding(ns.file)
    except EmbeddingError:
        from .tokens import looks_like_tokens

        if looks_like_tokens(ns.file):  # a textual-inversion file (negative tokens, ours or a third party's)
            return _print_tokens(ns)
        train = _training_checkpoint_info(ns.file)  # reneg train's checkpoint.pt
        if train is None:
            raise
        return _print_training_checkpoint(ns, train)
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

        print(f"  stats   mean {g(s['mean'])}  std {g(s['std'])}  norm {g(s['norm'])}  max |x| {g(info['max_abs'])}")
        if info["overflows"]:
            names = " and ".join(info["overflows"])
            print(
                f"  warning its values overflow {names} (they would become inf): refused where the model "
                f"computes in {names} (e.g. --mixed-precision fp16, an fp16 web UI)"
            )
        for k, v in sorted(info["metadata"].items()):
            print(f"  {_safe_text(k, 80)}: {_safe_text(v)}")
    return 0


def _print_tokens(ns) -> int:
    from .tokens import load_tokens

    info = load_tokens(ns.file).info()
    if ns.json:
        print(json.dumps(info, indent=2, allow_nan=False))
        return 0
    vecs = "  ".join(f"{k} {v}" for k, v in info["vectors"].items())
    print(
        f"{_safe_text(info['path'])}\n  format  textual-inversion file ({info['format']}): {info['tokens']} negative "
        f"token vectors, used by name in a UI's negative prompt\n  family  {info['family']}\n"
        f"  name    {_safe_text(info['name'], 120)}\n  vectors {vecs}  {info['dtype']}"
    )
    for k, norms in info["norms"].items():
        print(f"  norms   {k}: {_safe_text(' '.join(f'{x:.3g}' for x in norms), 300)}")
    for k, v in sorted(info["metadata"].items()):
        print(f"  {_safe_text(k, 80)}: {_safe_text(v)}")
    return 0


def _training_checkpoint_info(path: str) -> dict | None:
    """``reneg train``'s checkpoint (checkpoint.pt) described, or None for any other file."""
    from .fileio import safe_torch_load

    try:
        state = safe_torch_load(path, what="file")
    except (ValueError, OSError):
        return None
    if not isinstance(state, dict) or state.get("format") != "reneg-train-checkpoint":
        return None
    from reneg.trainer.checkpoint import load_checkpoint

    from .families import family_for_shape

    state = load_checkpoint(path)  # checked: a damaged checkpoint is an error naming the file
    neg, cfg = state["neg"], state["config"]
    fam = cfg.get("family")
    if fam is None:
        spec = family_for_shape(neg.shape[-1], neg.shape[1])
        fam = f"{spec.name} (from the shape)" if spec is not None else None
    groups = state["optimizer"].get("param_groups") or [{}]
    last = state["heldout"][-1] if state["heldout"] else None
    return {
        "path": path,
        "format": "reneg-train-checkpoint",
        "step": state["step"],
        "steps": cfg.get("steps"),
        "family": fam,
        "shape": list(neg.shape),
        "dtype": str(neg.dtype).replace("torch.", ""),
        "lr": groups[0].get("lr"),
        "skipped_updates": state.get("skipped", 0),
        "model": cfg.get("model"),
        "heldout_last": last,
    }


def _print_training_checkpoint(ns, info: dict) -> int:
    if ns.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    steps = f" of {info['steps']}" if info["steps"] is not None else ""
    print(
        f"{_safe_text(info['path'])}\n  format  ReNeg training checkpoint (resume it with reneg train --resume)\n"
        f"  step    {info['step']}{steps}  ({info['skipped_updates']} updates skipped)\n"
        f"  family  {info['family']}\n  shape   {info['shape']}  {info['dtype']}"
    )
    if info["lr"] is not None:
        print(f"  lr      {_safe_text(info['lr'], 40)}")
    if info["model"]:
        print(f"  model   {_safe_text(info['model'])}")
    last = info["heldout_last"]
    if last:
        shown = "  ".join(f"{k} {v:.5f}" for k, v in last.items() if k != "step" and isinstance(v, float))
        print(f"  held-out at step {_safe_text(last.get('step'), 20)}: {_safe_text(shown)}")
    return 0


def _inspect_checkpoint(ns) -> int:
    """A model checkpoint, described from its header: no weights are loaded."""
    from .backends.single_file import describe, inspect_checkpoint
    from .backends.single_file.qwen_image import qwen_image_part
    from .backends.single_file.read import open_checkpoint

    part = qwen_image_part(open_checkpoint(ns.file))  # a Qwen-Image transformer, text encoder or VAE file
    if part is not None:
        print(json.dumps(part.to_json(), indent=2) if ns.json else "\n".join(part.describe()))
        return 0
    info = inspect_checkpoint(ns.file)
    if ns.json:
        print(json.dumps(info.to_json(), indent=2))
    else:
        print("\n".join(describe(info)))
    return 0


def _cmd_convert(ns) -> int:
    from .embedding import convert
    from .families import FAMILIES

    if ns.to is not None:
        return _convert_to_tokens(ns)

    if ns.family is not None and ns.family not in FAMILIES:
        raise ValueError(f"--family {_safe_text(ns.family, 60)}: expected one of {', '.join(FAMILIES)}")
    if os.path.exists(ns.dst) and not ns.overwrite:
        raise ValueError(f"{ns.dst}: already exists (pass --overwrite to replace it)")
    emb = convert(ns.src, ns.dst, family=ns.family, overwrite=ns.overwrite)
    print(f"wrote {ns.dst}: {emb.family} {list(emb.tensor.shape)} {str(emb.tensor.dtype).replace('torch.', '')}")
    if emb.metadata.get("source_kind") == "predictor global part":
        print(
            f"  {ns.src} is a negative predictor: this is its global negative, the same for every prompt (its "
            f"per-prompt correction needs the predictor itself: docs/predictor.md)"
        )
    return 0


def _convert_to_tokens(ns) -> int:
    """``--to tokens N``: N input-token vectors fitted to the embedding (reneg/tokens.py), and how close."""
    what, n = ns.to
    if what != "tokens" or not n.isdigit():
        raise ValueError(f"--to {_safe_text(what, 20)} {_safe_text(n, 20)}: expected --to tokens N (N from 1 to 75)")
    if not ns.model:
        raise ValueError("--to tokens: needs --model (the model whose text encoder the tokens go through)")
    if ns.fit_steps < 1:
        raise ValueError(f"--fit-steps {ns.fit_steps}: expected at least 1")
    from .backends.loading import load_diffusers
    from .tokens import convert_to_tokens

    backend = load_diffusers(ns.model, device=ns.device)
    tok, rep = convert_to_tokens(
        ns.src,
        ns.dst,
        backend,
        int(n),
        steps=ns.fit_steps,
        lr=ns.fit_lr,
        overwrite=ns.overwrite,
        log=None if ns.json else (lambda m: print(m, flush=True)),
    )
    if ns.json:
        print(json.dumps(dict(rep, path=ns.dst), indent=2, allow_nan=False))
        return 0
    print(
        f"wrote {ns.dst}: {tok.family} {tok.count} token vectors ({', '.join(tok.vectors)})\n"
        f"  its encoding vs the embedding: relative error {rep['relative_error']:.4f}, cosine {rep['cosine']:.4f}, "
        f"row cosine min {rep['row_cosine_min']:.4f} mean {rep['row_cosine_mean']:.4f}"
        + (f", pooled relative error {rep['pooled_relative_error']:.4f}" if "pooled_relative_error" in rep else "")
        + f"\n  the empty prompt's encoding vs the embedding: relative error {rep['null_relative_error']:.4f}, "
        f"cosine {rep['null_cosine']:.4f}\n  kept {100 * rep['kept']:.1f} % of the way from the empty prompt to the "
        f"embedding (1 - error / empty prompt's error); closeness of encodings, not of images or rewards"
    )
    return 0


def _cmd_rewards(ns) -> int:
    from .rewards import reward_kinds

    for info in reward_kinds().values():
        print(f"{info.syntax}\n    {info.help}")
    return 0


def _apply_demo(ns, kind: str) -> None:
    from . import demo

    given = demo.refuse_demo_conflicts(ns, kind)
    if kind == "train" and not ns.out and getattr(ns, "resume", None) is None:
        # the demo's own folder: each `reneg train --demo` starts it afresh (the README's first command can be
        # run again); an --out you name is yours and is never replaced without --overwrite
        ns.overwrite = True
    out = ns.out or os.path.join("runs", f"demo-{kind}")
    d = demo.setup(out if kind == "train" else os.path.dirname(os.path.abspath(out)) or ".")
    print(f"reneg {kind} --demo: {d['kind']} ({d['model']})", flush=True)
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
        if "monitor_rewards" not in given:  # the held-out judges watch for reward hacking (never trained on)
            ns.monitor_rewards = list(d.get("judges") or [])
    else:
        if "prompt" not in given:
            ns.prompt = d["heldout_texts"][0]
        for k in ("resolution", "sampling_steps", "guidance", "grad_range"):
            if k not in given:
                setattr(ns, k, s[k])
        if "lr" not in given:
            ns.lr = s.get("tune_lr", s["lr"])
    overridden = sorted(k for k in given if k not in ("demo", "out", "progress", "command", "guidance_mode"))
    if overridden:
        from .options import flag_of

        print(
            f"reneg {kind} --demo: using your {', '.join(flag_of(k) for k in overridden)} instead of the demo's",
            flush=True,
        )


def _cmd_train(ns) -> int:
    from reneg.trainer.config import train_config_from_args
    from reneg.trainer.train import TrainingStopped, run_train

    if ns.demo:
        _apply_demo(ns, "train")
    try:
        # the command, not the library, listens for SIGTERM and Ctrl-C: the run stops after its step
        summary = run_train(train_config_from_args(ns), handle_signals=True)
    except TrainingStopped as e:
        print(
            f"stopped at step {e.step} of {e.steps}: {e.checkpoint} holds the run; the same command "
            f"with --resume continues it (exit status {e.exit_code}: not finished)",
            flush=True,
        )
        return e.exit_code
    if summary.get("kind") == "predictor":  # reneg train --predictor (trainer/predictor.py)
        h = summary["heldout"]
        print(
            f"held-out mean reward ({summary['heldout_prompts']} prompts): null {h['null']:.5f}  "
            f"global part alone {h['global']:.5f}  predictor {h['predictor']:.5f}\n"
            f"wrote {summary['predictor_file']} and {summary['embedding']} (its global negative)"
        )
    elif summary:
        h = summary["heldout"]
        print(
            f"held-out mean reward ({summary['heldout_prompts']} prompts): null {h['null']:.5f}  "
            f"handcrafted {h['handcrafted']:.5f}  learned {h['learned']:.5f}"
        )
        for name in [k[: -len("_learned")] for k in h if k.endswith("_learned")]:
            print(
                f"held-out {name} (monitor): null {h[name + '_null']:.5f}  "
                f"handcrafted {h[name + '_handcrafted']:.5f}  learned {h[name + '_learned']:.5f}"
            )
        if h.get("diversity") is not None:
            print(f"held-out diversity of the learned images (across prompts): {h['diversity']:.5f}")
        if summary.get("warnings"):
            print(f"{len(summary['warnings'])} reward-hacking warning(s): see above and summary.json")
        if summary.get("best"):
            b = summary["best"]
            print(f"best held-out {b['by']}: {b['value']:.5f} at step {b['step']}, kept in {b['embedding']}")
        print(f"wrote {summary['embedding']} and {os.path.join(os.path.dirname(summary['embedding']), 'summary.json')}")
    return 0


def _cmd_tune(ns) -> int:
    from reneg.trainer.tune import run_tune

    if ns.demo:
        if not ns.out:  # the demo's own file is replaced each time; an --out you name is yours
            ns.out = os.path.join("runs", "demo-tune", "tuned.safetensors")
            folder = os.path.dirname(os.path.abspath(ns.out))
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as e:
                why = "a file is in the way" if isinstance(e, FileExistsError) else e.strerror or e
                raise ValueError(f"--out {ns.out}: cannot create the folder {folder} ({why})") from None
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


def _port(text: str) -> int:
    """A TCP port for ``--port``: an integer from 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a port number from 1 to 65535, got {_safe_text(text, 40)}"
        ) from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {_safe_text(text, 40)}")
    return port


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .families import FAMILIES

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

    s = sub.add_parser(
        "convert",
        help="convert an embedding file to ReNeg's .safetensors format, or (--to tokens N) fit N negative tokens to it",
    )
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--family", help=f"{', '.join(FAMILIES)} (default: from the shape)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument(
        "--to",
        nargs=2,
        metavar=("tokens", "N"),
        help="fit N input-token vectors (a textual-inversion file every UI loads by name, DST .safetensors or "
        ".pt) to the embedding through --model's text encoder, and report how close their encoding comes",
    )
    s.add_argument("--model", help="--to tokens: the model (diffusers folder or single file) the embedding is for")
    s.add_argument("--fit-steps", type=int, default=300, help="--to tokens: Adam steps of the fit (default 300)")
    s.add_argument("--fit-lr", type=float, default=0.15, help="--to tokens: the fit's learning rate (default 0.15)")
    s.add_argument("--device", default="cpu", help="--to tokens: where the text encoder runs (default cpu)")
    s.add_argument("--json", action="store_true", help="--to tokens: the report as JSON")
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
    s.add_argument("--port", type=_port, default=7860, help="the port to serve on, 1 to 65535 (default: 7860)")
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
        if hasattr(ns, "threads"):  # train, tune, eval: before any model work
            from . import demo
            from .threads import apply_threads, default_spec

            spec = default_spec() if ns.threads == "auto" else ns.threads
            apply_threads(spec, most=demo.default_threads() if getattr(ns, "demo", False) else None)
        return ns.fn(ns) or 0
    except KeyboardInterrupt as e:
        sig = getattr(e, "signum", 2)
        print("reneg: stopped (SIGTERM)" if sig == 15 else "reneg: interrupted", file=sys.stderr)
        return 128 + sig
    except BrokenPipeError:
        # the reader went away (reneg inspect ... | head): stop quietly, as cat does
        _silence_stdout()
        return 141
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
        from .threads import release

        release()  # --threads auto follows the load during the command only
        if old is not None:
            # the process's own command line (argv None): it is exiting with the status just returned, and a
            # late SIGTERM (a second Stop) must not replace it; a caller in Python gets its handler back
            signal.signal(signal.SIGTERM, signal.SIG_IGN if argv is None else old)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing at exit does not raise again into the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
