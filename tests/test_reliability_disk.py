"""Disk: a full disk or a read-only output folder fails with a clear message and
loses no earlier checkpoint.

Tests run as root, where ``chmod`` does not stop writes, and mounting a small or
read-only filesystem needs privileges a test should not ask for. So the filesystem's
answers are simulated at the system-call boundary, for one folder only: ``os.open`` and
``open`` raise ``EROFS`` for a read-only folder; for a full disk, files open but
``write`` stores half of what it is given and then raises ``ENOSPC`` (or ``fsync``
raises ``EIO``), as real filesystems do.
"""

from __future__ import annotations

import builtins
import errno
import glob
import json
import os

import pytest
import torch

from reneg.embedding import NegEmbedding, load_embedding, make_metadata, save_embedding
from reneg.fileio import OutputError, atomic_save_safetensors, atomic_torch_save, atomic_write_json
from reneg.trainer.checkpoint import load_checkpoint

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class _FullFile:
    """A real file object whose writes store half the bytes, then fail with ENOSPC."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class BadFolder:
    """Make one folder read-only (``erofs``), full (``enospc``) or failing at fsync (``eio``)."""

    def __init__(self, monkeypatch, folder: str, mode: str):
        self.folder = os.path.abspath(folder)
        self.mode = mode
        self.armed = False
        self.hits = 0
        real_open, real_os_open, real_fsync = builtins.open, os.open, os.fsync

        def inside(path) -> bool:
            try:
                p = os.path.abspath(os.fspath(path))
            except TypeError:
                return False
            return p == self.folder or p.startswith(self.folder + os.sep)

        def fake_os_open(path, flags, *args, **kwargs):
            if self.armed and self.mode == "erofs" and flags & _WRITE_FLAGS and inside(path):
                self.hits += 1
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
            return real_os_open(path, flags, *args, **kwargs)

        def fake_open(file, mode="r", *args, **kwargs):
            writing = any(c in mode for c in "wax+")
            if self.armed and writing and not isinstance(file, int) and inside(file):
                self.hits += 1
                if self.mode == "erofs":
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(file))
                if self.mode == "enospc":
                    return _FullFile(real_open(file, mode, *args, **kwargs))
            return real_open(file, mode, *args, **kwargs)

        def fake_fsync(fd):
            if self.armed and self.mode == "eio":
                self.hits += 1
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real_fsync(fd)

        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(os, "fsync", fake_fsync)
        if mode == "erofs":  # renames and chmods into a read-only folder fail too
            real_replace, real_chmod = os.replace, os.chmod

            def fake_replace(src, dst, *a, **k):
                if self.armed and inside(dst):
                    self.hits += 1
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(dst))
                return real_replace(src, dst, *a, **k)

            def fake_chmod(path, *a, **k):
                if self.armed and inside(path):
                    self.hits += 1
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
                return real_chmod(path, *a, **k)

            monkeypatch.setattr(os, "replace", fake_replace)
            monkeypatch.setattr(os, "chmod", fake_chmod)


STRERROR = {"erofs": os.strerror(errno.EROFS), "enospc": os.strerror(errno.ENOSPC), "eio": os.strerror(errno.EIO)}


def no_temp_files(folder) -> list[str]:
    return glob.glob(os.path.join(folder, ".*.tmp"))


# --- the atomic writers themselves ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["enospc", "erofs", "eio"])
def test_atomic_writers_keep_the_old_file(tmp_path, monkeypatch, mode):
    folder = tmp_path / "out"
    folder.mkdir()
    t = torch.randn(1, 77, 64)
    targets = {
        "ckpt.pt": lambda p: atomic_torch_save(p, {"neg": t * 2}),
        "tensors.safetensors": lambda p: atomic_save_safetensors(p, {"x": t * 2}, {"a": "b"}),
        "summary.json": lambda p: atomic_write_json(p, {"new": True}),
        "emb.safetensors": lambda p: save_embedding(p, NegEmbedding(t * 2, "tiny"), overwrite=True),
    }
    before = {}
    for name, write in targets.items():  # good files first
        if name == "emb.safetensors":
            save_embedding(str(folder / name), NegEmbedding(t, "tiny", metadata=make_metadata("tiny", "global")))
        else:
            write(str(folder / name))
        before[name] = (folder / name).read_bytes()
    bad = BadFolder(monkeypatch, str(folder), mode)
    bad.armed = True
    for name, write in targets.items():
        with pytest.raises(OutputError) as ei:
            write(str(folder / name))
        msg = str(ei.value)
        assert str(folder / name) in msg and STRERROR[mode] in msg, msg
        assert "\n" not in msg
    bad.armed = False
    assert bad.hits >= len(targets)
    for name in targets:
        assert (folder / name).read_bytes() == before[name], f"{name} was damaged"
    assert no_temp_files(str(folder)) == []
    assert torch.equal(load_embedding(folder / "emb.safetensors").tensor, t)


# --- training runs ----------------------------------------------------------------------------


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a red circle\na blue square\na green star\na yellow triangle\na purple circle\n")
    return str(p)


def train(model, reward, prompts, out, *extra):
    from reneg.cli import main

    return main(
        [
            "train",
            "--model",
            model,
            "--reward",
            f"hpsv2={reward}",
            "--prompts",
            prompts,
            "--heldout-count",
            "2",
            "--out",
            out,
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--micro-batch",
            "2",
            "--sampling-steps",
            "3",
            "--grad-range",
            "0",
            "1",
            "--resolution",
            "16",
            "--checkpoint-every",
            "2",
            "--eval-every",
            "0",
            "--eval-batch",
            "2",
            "--lr",
            "5e-2",
            "--device",
            "cpu",
            "--no-progress",
            *extra,
        ]
    )


def arm_after_first_checkpoint(monkeypatch, bad: BadFolder):
    import reneg.trainer.train as tt

    real = tt.save_run_files

    def save(*a, **k):
        real(*a, **k)  # embedding.safetensors and checkpoint.pt, both in place
        bad.armed = True  # the disk fills up (or turns read-only) right after checkpoint 2

    monkeypatch.setattr(tt, "save_run_files", save)


@pytest.mark.parametrize("mode", ["enospc", "erofs", "eio"])
def test_training_on_a_failing_disk_keeps_the_last_checkpoint(
    tiny_pipeline_dir, tiny_hps_ckpt, prompts, tmp_path, monkeypatch, capsys, mode
):
    out = str(tmp_path / "run")
    bad = BadFolder(monkeypatch, out, mode)
    arm_after_first_checkpoint(monkeypatch, bad)
    assert train(tiny_pipeline_dir, tiny_hps_ckpt, prompts, out) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("reneg")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("reneg train: error: ") and STRERROR[mode] in lines[0], lines[0]
    assert out in lines[0]  # names the file it could not write
    bad.armed = False
    state = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert state["step"] == 2 and torch.isfinite(state["neg"]).all()
    emb = load_embedding(os.path.join(out, "embedding.safetensors"))
    assert emb.metadata["trained_steps"] == "2" and torch.equal(emb.tensor, state["neg"])
    with open(os.path.join(out, "summary.json")) as f:  # it never says the run finished
        assert json.load(f)["status"] == "running"  # (the full disk kept it from saying "failed")
    assert no_temp_files(out) == []
    # space freed (or the folder writable again): --resume finishes the run
    monkeypatch.undo()
    assert train(tiny_pipeline_dir, tiny_hps_ckpt, prompts, out, "--resume") == 0
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == 4


@pytest.mark.parametrize("mode", ["enospc", "erofs"])
def test_unwritable_out_folder_is_refused_before_any_model_loads(
    tiny_hps_ckpt, prompts, tmp_path, monkeypatch, capsys, mode
):
    import reneg.backends.loading as db
    from reneg.cli import main

    def no_load(*a, **k):
        raise AssertionError("a model was loaded although --out is not writable")

    monkeypatch.setattr(db, "load_diffusers", no_load)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    out = tmp_path / "run"
    out.mkdir()
    bad = BadFolder(monkeypatch, str(out), mode)
    bad.armed = True
    assert train(str(model), tiny_hps_ckpt, prompts, str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"reneg train: error: --out {out}: the folder is not writable") and STRERROR[mode] in err, err
    # tune, with a file in that folder as its --out
    capsys.readouterr()
    assert (
        main(
            [
                "tune",
                "--model",
                str(model),
                "--reward",
                f"hpsv2={tiny_hps_ckpt}",
                "--prompt",
                "a cat",
                "--out",
                str(out / "tuned.safetensors"),
                "--sampling-steps",
                "4",
                "--grad-range",
                "0",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"reneg tune: error: --out {out}: the folder is not writable") and STRERROR[mode] in err, err
    assert bad.hits >= 2


def test_tune_on_a_full_disk_keeps_the_old_file(tiny_pipeline_dir, tiny_hps_ckpt, tmp_path, monkeypatch, capsys):
    from reneg.cli import main

    out = tmp_path / "tuned"
    out.mkdir()
    target = out / "tuned.safetensors"
    old = NegEmbedding(torch.zeros(1, 77, 64), "tiny", metadata=make_metadata("tiny", "per-sample"))
    save_embedding(str(target), old)
    before = target.read_bytes()
    bad = BadFolder(monkeypatch, str(out), "enospc")

    import reneg.trainer.tune as tn

    real_save = tn.save_embedding

    def save(*a, **k):  # the disk fills up while tuning, before the result is written
        bad.armed = True
        return real_save(*a, **k)

    monkeypatch.setattr(tn, "save_embedding", save)
    rc = main(
        [
            "tune",
            "--model",
            tiny_pipeline_dir,
            "--reward",
            f"hpsv2={tiny_hps_ckpt}",
            "--prompt",
            "a red circle",
            "--out",
            str(target),
            "--overwrite",
            "--sampling-steps",
            "3",
            "--grad-range",
            "0",
            "1",
            "--resolution",
            "16",
            "--max-steps",
            "2",
            "--patience",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert rc == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("reneg")]
    assert len(lines) == 1 and str(target) in lines[0] and STRERROR["enospc"] in lines[0], lines
    bad.armed = False
    assert target.read_bytes() == before
    assert no_temp_files(str(out)) == []


def test_log_write_on_a_full_disk_names_the_file(tmp_path):
    """log.csv is held open during a run: when the disk fills, its write fails first."""
    from reneg.trainer.train import CsvLog

    path = str(tmp_path / "log.csv")
    log = CsvLog(path, 0)
    log.write({"step": 1, "loss": 0.5})
    import csv

    log.f = _FullFile(log.f)  # the disk is full from now on
    log.w = csv.DictWriter(log.f, CsvLog.FIELDS, extrasaction="ignore")
    with pytest.raises(OutputError) as ei:
        log.write({"step": 2, "loss": 0.25})
    assert path in str(ei.value) and STRERROR["enospc"] in str(ei.value)
    log.close()
