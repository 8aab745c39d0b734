"""The ``reneg`` command: inspect, convert, train, tune, eval, rewards."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_inspect(ns) -> int:
    from .embedding import load_embedding

    emb = load_embedding(ns.file)
    info = emb.info()
    if ns.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{info['path']}\n  format  {info['format']}\n  family  {info['family']}\n"
              f"  shape   {info['shape']}  {info['dtype']}")
        if info["pooled_shape"]:
            print(f"  pooled  {info['pooled_shape']}")
        s = info["stats"]
        print(f"  stats   mean {s['mean']:.4g}  std {s['std']:.4g}  norm {s['norm']:.4g}")
        for k, v in sorted(info["metadata"].items()):
            print(f"  {k}: {v}")
    return 0


def _cmd_convert(ns) -> int:
    from .embedding import convert

    if os.path.exists(ns.dst) and not ns.overwrite:
        raise ValueError(f"{ns.dst}: already exists (pass --overwrite to replace it)")
    emb = convert(ns.src, ns.dst, family=ns.family, overwrite=ns.overwrite)
    print(f"wrote {ns.dst}: {emb.family} {list(emb.tensor.shape)} {str(emb.tensor.dtype).replace('torch.', '')}")
    return 0


def _cmd_rewards(ns) -> int:
    from .rewards import available

    for name, info in sorted(available().items()):
        print(f"{name:10s} {info.help}")
    return 0


def _apply_demo(ns, kind: str) -> None:
    import torch

    from . import demo

    out = ns.out or os.path.join("runs", f"demo-{kind}")
    d = demo.setup(out if kind == "train" else os.path.dirname(os.path.abspath(out)) or ".")
    print(f"reneg {kind} --demo: {d['kind']} ({d['model']})", flush=True)
    torch.set_num_threads(demo.default_threads())
    ns.model, ns.rewards = d["model"], [d["reward"]]
    s = d["settings"]
    if kind == "train":
        ns.out, ns.prompts, ns.heldout, ns.handcrafted = out, d["prompts"], d["heldout"], d["handcrafted"]
        for k, v in s.items():
            setattr(ns, k, v)
        ns.base_model_name = "reneg-demo"
    else:
        ns.prompt = ns.prompt or d["heldout_texts"][0]
        for k in ("resolution", "sampling_steps", "guidance", "grad_range"):
            setattr(ns, k, s[k])
        ns.lr = s.get("tune_lr", s["lr"])


def _cmd_train(ns) -> int:
    from reneg.trainer.config import config_from_args
    from reneg.trainer.train import run_train

    if ns.demo:
        _apply_demo(ns, "train")
    summary = run_train(config_from_args(ns))
    if summary.get("stopped"):
        print(f"stopped at step {summary['step']}: {summary['checkpoint']} holds the run; the same command "
              f"with --resume continues it")
    elif summary:
        h = summary["heldout"]
        print(f"held-out mean reward ({summary['heldout_prompts']} prompts): null {h['null']:.5f}  "
              f"handcrafted {h['handcrafted']:.5f}  learned {h['learned']:.5f}")
        print(f"wrote {summary['embedding']} and {os.path.join(os.path.dirname(summary['embedding']), 'summary.json')}")
    return 0


def _cmd_tune(ns) -> int:
    from reneg.trainer.tune import run_tune

    if ns.demo:
        ns.out = ns.out or os.path.join("runs", "demo-tune", "tuned.safetensors")
        os.makedirs(os.path.dirname(os.path.abspath(ns.out)), exist_ok=True)
        ns.overwrite = True
        _apply_demo(ns, "tune")
    ns.out = ns.out or "tuned.safetensors"
    rep = run_tune(ns)
    print(f"start reward {rep['start_reward']:.5f} -> best {rep['best_reward']:.5f} at step {rep['best_step']} "
          f"({rep['stopped']}); wrote {rep['embedding']}")
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

    p = argparse.ArgumentParser(prog="reneg", description="Learned negative embeddings for "
                                "classifier-free guidance (ReNeg).")
    p.add_argument("--version", action="version", version=f"reneg {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="show an embedding file's family, shape and metadata")
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
    s.add_argument("--listen", action="store_true",
                   help="serve on all network interfaces instead of 127.0.0.1 only (anyone who can reach the "
                        "port can start runs and read files)")
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


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    ns = p.parse_args(argv)
    try:
        return ns.fn(ns) or 0
    except KeyboardInterrupt:
        print("reneg: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        # every expected failure carries a message naming the file or flag
        print(f"reneg {ns.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
