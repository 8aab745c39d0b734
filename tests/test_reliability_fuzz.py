"""Untrusted files: every loader (embeddings, reward checkpoints, trainer
checkpoints) refuses pickles that would run code, and survives a seeded fuzz run over
truncated, bit-flipped and header-mangled files (safetensors and pickle) with a clear
error each time: no other exception type, no hang, no huge allocation from a lying
header.

A case passes when the load either returns a valid result (a finite embedding of a
known family, a reward giving finite scores, a well-formed checkpoint) or raises
``ValueError`` (``EmbeddingError`` is one) whose message names the file.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib

import pytest
import torch

from reneg.embedding import NegEmbedding, load_embedding, make_metadata, save_embedding
from reneg.families import FAMILIES
from reneg.rewards import load_reward
from reneg.trainer.checkpoint import load_checkpoint, save_checkpoint

SEED = 20250607
FIGURES: dict[str, int] = {}

# A small open_clip architecture, so each fuzzed HPS-format file is about 1 MB.
SMALL_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang("time limit")


def run_limited(fn, seconds: float = 10.0):
    """Run ``fn()`` under a wall-clock limit (SIGALRM; tests run in the main thread)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- mutations ------------------------------------------------------------------------------


def structural_regions(raw: bytes) -> list[tuple[int, int]]:
    """Byte ranges holding a format's structure, where mutations hit headers, not values."""
    n = len(raw)
    if raw[:4] == b"PK\x03\x04":
        regions = [(0, min(n, 600)), (max(0, n - 1500), n)]
        try:
            with zipfile.ZipFile(io.BytesIO(raw)) as z:
                for info in z.infolist():
                    if info.filename.endswith("data.pkl"):
                        regions.append((info.header_offset, min(n, info.header_offset + 120 + info.file_size)))
        except zipfile.BadZipFile:
            pass
        return regions
    if raw[:1] == b"\x80":  # legacy pickle: the pickles come first, then raw storages
        return [(0, min(n, 1200))]
    # safetensors: 8-byte length + JSON header
    (hl,) = struct.unpack("<Q", raw[:8])
    return [(0, min(n, 8 + hl))]


def mutate(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    n = len(raw)
    regions = structural_regions(raw)

    def pos(structural: bool) -> int:
        if structural:
            a, b = rng.choice(regions)
            return rng.randrange(a, max(a + 1, b))
        return rng.randrange(n)

    kind = rng.choice(["truncate", "bitflip", "bitflip", "header", "header", "insert", "delete", "swap-length"])
    b = bytearray(raw)
    if kind == "truncate":
        cut = rng.choice([0, 1, 4, 7, 8, 9, pos(True), pos(False), n - 1])
        return kind, bytes(b[:cut])
    if kind == "bitflip":
        structural = rng.random() < 0.7
        for _ in range(rng.randint(1, 6)):
            i = pos(structural)
            b[i] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "header":
        i = pos(True)
        for j in range(i, min(n, i + rng.randint(1, 12))):
            b[j] = rng.choice([0, 0xFF, 0x7F, 0x80, ord("9"), ord("{"), ord('"'), rng.randrange(256)])
        return kind, bytes(b)
    if kind == "insert":
        i = pos(rng.random() < 0.7)
        return kind, bytes(b[:i]) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 32))) + bytes(b[i:])
    if kind == "delete":
        i = pos(rng.random() < 0.7)
        return kind, bytes(b[:i]) + bytes(b[i + rng.randint(1, 32) :])
    # swap-length: rewrite a length field (safetensors prefix, zip sizes) with a lie
    lie = rng.choice([0, 1, n, n * 1000, 2**31 - 1, 2**32 - 1, 2**40, 2**63 - 1])
    if raw[:4] == b"PK\x03\x04":
        sigs = [k for k in range(n - 4) if b[k : k + 4] in (b"PK\x01\x02", b"PK\x03\x04", b"PK\x05\x06")]
        k = rng.choice(sigs)
        off = {
            b"PK\x01\x02": rng.choice([20, 24, 42]),
            b"PK\x03\x04": rng.choice([18, 22]),
            b"PK\x05\x06": rng.choice([8, 10, 12, 16]),
        }[bytes(b[k : k + 4])]
        width = 2 if off in (8, 10) else 4
        b[k + off : k + off + width] = (lie % (1 << (8 * width))).to_bytes(width, "little")
        return "zip-size-lie", bytes(b)
    if raw[:1] == b"\x80":
        i = pos(True)
        b[i : i + 4] = (lie % 2**32).to_bytes(4, "little")
        return "pickle-int-lie", bytes(b)
    b[:8] = struct.pack("<Q", lie)
    return "safetensors-length-lie", bytes(b)


# --- sources --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from reneg.tiny import build_tiny_hps

    d = tmp_path_factory.mktemp("fuzz-src")
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, 77, 64, generator=g) * 0.1
    src = {}
    p = d / "emb.safetensors"
    save_embedding(p, NegEmbedding(t, "tiny", metadata=make_metadata("tiny", "global")))
    src["embedding-safetensors"] = p
    p = d / "emb_official_style.bin"  # the paper's release: a bare tensor, torch.save zip format
    torch.save(t, p)
    src["embedding-pickle-zip"] = p
    p = d / "emb_legacy.pt"  # pre-1.6 torch.save format, a dict as diffusers users keep
    torch.save({"negative_prompt_embeds": t, "metadata": {"family": "tiny"}}, p, _use_new_zipfile_serialization=False)
    src["embedding-pickle-legacy"] = p
    hps = build_tiny_hps(str(d / "hps"), seed=0, config=SMALL_CLIP)
    src["hps-checkpoint"] = hps
    neg = torch.nn.Parameter(t.clone())
    opt = torch.optim.AdamW([neg], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    neg.grad = torch.randn_like(t)
    opt.step()
    sched.step()
    p = d / "checkpoint.pt"
    save_checkpoint(
        str(p),
        step=3,
        neg=neg,
        optimizer=opt,
        scheduler=sched,
        skipped=1,
        config={"steps": 6},
        heldout=[{"step": 2, "null": 0.1}],
    )
    src["trainer-checkpoint"] = p
    return d, src


def is_valid_embedding(e) -> bool:
    return (
        isinstance(e, NegEmbedding)
        and e.tensor.dim() == 3
        and e.tensor.shape[0] == 1
        and e.family in FAMILIES
        and e.tensor.shape[-1] == FAMILIES[e.family].hidden
        and bool(torch.isfinite(e.tensor).all())
    )


def is_valid_reward(r) -> bool:
    """Finite weights and a finite image-side score (the small test vocabularies do not
    cover the real tokenizer's ids, so the text side is not run here)."""
    from reneg.rewards.hps import OpenClipScore

    if not all(bool(torch.isfinite(p).all()) for p in r.parameters()):
        return False
    with torch.no_grad():
        if isinstance(r, OpenClipScore):
            s = r.model.encode_image(torch.zeros(1, 3, r.size, r.size))
        else:
            s = r(torch.zeros(1, 3, 16, 16), ["a red circle"])
    return bool(torch.isfinite(s).all())


def is_valid_checkpoint(s) -> bool:
    return (
        isinstance(s, dict)
        and isinstance(s["step"], int)
        and s["step"] >= 0
        and isinstance(s["neg"], torch.Tensor)
        and bool(torch.isfinite(s["neg"]).all())
        and isinstance(s["optimizer"], dict)
        and isinstance(s["config"], dict)
        and isinstance(s["heldout"], list)
    )


def fuzz(name: str, raw: bytes, suffix: str, folder, load, valid, cases: int, rng: random.Random, place=None):
    """Run ``cases`` mutated copies of ``raw`` through ``load``; return the failures."""
    failures, outcomes = [], {"loaded": 0, "refused": 0}
    for i in range(cases):
        kind, data = mutate(raw, rng)
        path = os.path.join(folder, f"{name}-{i}{suffix}")
        with open(path, "wb") as f:
            f.write(data)
        target = place(path) if place else path
        t0 = time.time()
        try:
            result = run_limited(lambda target=target: load(target))
        except Hang:
            failures.append(f"{name} #{i} ({kind}): no answer within the time limit")
            continue
        except ValueError as e:
            msg = str(e)
            if os.path.basename(path) not in msg:
                failures.append(f"{name} #{i} ({kind}): message does not name the file: {msg[:200]}")
            elif "\n" in msg.strip():
                failures.append(f"{name} #{i} ({kind}): message is not one line: {msg[:200]}")
            outcomes["refused"] += 1
        except Exception as e:  # noqa: BLE001 - the point of the test
            failures.append(f"{name} #{i} ({kind}): {type(e).__name__} escaped: {str(e)[:200]}")
        else:
            if not valid(result):
                failures.append(f"{name} #{i} ({kind}): loaded an invalid result")
            outcomes["loaded"] += 1
        if time.time() - t0 > 5:
            failures.append(f"{name} #{i} ({kind}): took {time.time() - t0:.1f} s")
        os.unlink(path)
    FIGURES[name] = cases
    return failures, outcomes


def test_fuzz_embedding_files(sources, tmp_path):
    _, src = sources
    rng = random.Random(SEED)
    failures, summary = [], {}
    for name, cases, suffix in (
        ("embedding-safetensors", 160, ".safetensors"),
        ("embedding-pickle-zip", 140, ".bin"),
        ("embedding-pickle-legacy", 100, ".pt"),
    ):
        raw = open(src[name], "rb").read()
        f, o = fuzz(name, raw, suffix, tmp_path, load_embedding, is_valid_embedding, cases, rng)
        failures += f
        summary[name] = o
    assert not failures, f"{len(failures)} bad outcomes:\n" + "\n".join(failures[:15])
    # the fuzzer reached both outcomes for every format
    assert all(o["refused"] > 10 for o in summary.values()), summary


def test_fuzz_trainer_checkpoints(sources, tmp_path):
    _, src = sources
    rng = random.Random(SEED + 1)
    raw = open(src["trainer-checkpoint"], "rb").read()
    failures, o = fuzz("trainer-checkpoint", raw, ".pt", tmp_path, load_checkpoint, is_valid_checkpoint, 140, rng)
    assert not failures, f"{len(failures)} bad outcomes:\n" + "\n".join(failures[:15])
    assert o["refused"] > 20 and o["loaded"] > 0, o


def test_fuzz_hps_reward_checkpoints(sources, tmp_path):
    """HPS-format files through the HPS loader's checkpoint reader (one model, many files),
    then some through the whole reward loader (``hpsv2=FILE,config=...``) as --reward does."""
    from reneg.rewards.hps import build_open_clip, load_state_dict_into

    d, src = sources
    rng = random.Random(SEED + 2)
    raw = open(src["hps-checkpoint"], "rb").read()
    cfg = os.path.join(os.path.dirname(src["hps-checkpoint"]), "open_clip_config.json")
    model, _ = build_open_clip(None, cfg, "test")

    def read(path):
        load_state_dict_into(model, path, "HPS checkpoint")
        return model

    def finite(m):
        return all(bool(torch.isfinite(p).all()) for p in m.parameters())

    failures, o = fuzz("hps-checkpoint", raw, ".pt", tmp_path, read, finite, 100, rng)

    def load(path):
        return load_reward(f"hpsv2={path},config={cfg}")

    f2, o2 = fuzz("hps-reward-loader", raw, ".pt", tmp_path, load, is_valid_reward, 12, rng)
    failures += f2
    assert not failures, f"{len(failures)} bad outcomes:\n" + "\n".join(failures[:15])
    assert o["refused"] > 10 and o["loaded"] > 0, o


def test_fuzz_aesthetic_mlp(tmp_path):
    """The aesthetic MLP file (a state_dict pickle) through ``aesthetic=FILE,clip=FOLDER``."""
    from transformers import CLIPConfig, CLIPModel

    from reneg.rewards.aesthetic import AestheticMLP

    clip = tmp_path / "clip"
    cfg = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=1000,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(str(clip))
    buf = io.BytesIO()
    torch.save(AestheticMLP(16).state_dict(), buf)
    rng = random.Random(SEED + 3)

    def load(path):
        return load_reward(f"aesthetic={path},clip={clip}")

    failures, o = fuzz("aesthetic-mlp", buf.getvalue(), ".pth", tmp_path, load, is_valid_reward, 50, rng)
    assert not failures, f"{len(failures)} bad outcomes:\n" + "\n".join(failures[:15])
    assert o["refused"] > 10, o


def test_structurally_wrong_but_well_formed_files(tmp_path):
    """Valid containers holding the wrong things: each is a clear ValueError."""
    cases = {
        "not-a-dict.pt": [1, 2, 3],
        "int-tensor.pt": torch.zeros(1, 77, 64, dtype=torch.int64),
        "rank-4.pt": torch.zeros(1, 1, 77, 64),
        "no-tensor.pt": {"neg_embedding": "hello"},
        "nested.pt": {"a": {"b": {"c": torch.zeros(3)}}},
        "empty.pt": {},
        "deep.pt": [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]],
        "huge-string.pt": "x" * 100000,
    }
    for name, obj in cases.items():
        p = tmp_path / name
        torch.save(obj, p)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load_embedding(p)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load_checkpoint(str(p))
    # a checkpoint-shaped dict with wrong field types
    base = {
        "format": "reneg-train-checkpoint",
        "version": 1,
        "step": 2,
        "neg": torch.zeros(1, 77, 64),
        "optimizer": {"state": {}, "param_groups": [{"params": [0]}]},
        "scheduler": {},
        "skipped": 0,
        "config": "{}",
        "heldout": "[]",
        "extra": "{}",
    }
    bad = {
        "step-str": {"step": "2"},
        "step-neg": {"step": -1},
        "neg-nan": {"neg": torch.full((1, 77, 64), float("nan"))},
        "neg-1d": {"neg": torch.zeros(5)},
        "opt-list": {"optimizer": [1]},
        "config-int": {"config": 5},
        "config-bad-json": {"config": "{"},
        "heldout-obj": {"heldout": "{}"},
        "heldout-ints": {"heldout": "[1]"},
        "opt-nan": {
            "optimizer": {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}, "param_groups": [{"params": [0]}]}
        },
    }
    for name, patch in bad.items():
        p = tmp_path / f"ck-{name}.pt"
        torch.save(dict(base, **patch), p)
        with pytest.raises(ValueError, match=f"ck-{name}"):
            load_checkpoint(str(p))
    p = tmp_path / "ck-good.pt"
    torch.save(base, p)
    assert load_checkpoint(str(p))["step"] == 2
    # an aesthetic MLP whose first layer is not a matrix
    clipdir = tmp_path / "clip"
    clipdir.mkdir()
    (clipdir / "config.json").write_text("{}")
    for name, sd in {
        "mlp-1d.pth": {"layers.0.weight": torch.zeros(5)},
        "mlp-str.pth": {"layers.0.weight": "x"},
        "mlp-nan.pth": {
            k: torch.full_like(v, float("nan"))
            for k, v in __import__("reneg.rewards.aesthetic", fromlist=["x"]).AestheticMLP(8).state_dict().items()
        },
    }.items():
        p = tmp_path / name
        torch.save(sd, p)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load_reward(f"aesthetic={p},clip={clipdir}")


# --- malicious pickles ------------------------------------------------------------------------


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def malicious_files(folder, marker) -> dict[str, str]:
    """Pickles whose loading would create ``marker``: zip and legacy torch formats, raw
    pickles of several protocols, and one hidden under a tensor-looking dict."""
    out = {}
    t = torch.zeros(1, 77, 64)

    def save(name, obj, **kw):
        p = os.path.join(folder, name)
        torch.save(obj, p, **kw)
        out[name] = p

    save("evil_zip.pt", {"neg_embedding": t, "payload": _System(marker)})
    save("evil_zip_exec.bin", _Exec(marker))
    save("evil_legacy.pt", {"neg_embedding": t, "payload": _System(marker)}, _use_new_zipfile_serialization=False)
    for proto in (0, 2, 4, 5):
        p = os.path.join(folder, f"evil_raw_p{proto}.bin")
        with open(p, "wb") as f:
            f.write(pickle.dumps(_System(marker), protocol=proto))
        out[os.path.basename(p)] = p
    p = os.path.join(folder, "evil_pickle_named.safetensors")
    with open(p, "wb") as f:
        f.write(pickle.dumps(_Exec(marker), protocol=2))
    out[os.path.basename(p)] = p
    # a checkpoint-shaped file with a payload inside the optimizer state
    p = os.path.join(folder, "evil_checkpoint.pt")
    torch.save(
        {
            "format": "reneg-train-checkpoint",
            "step": 1,
            "neg": t,
            "optimizer": {"state": {0: {"exp_avg": _System(marker)}}, "param_groups": []},
            "scheduler": {},
        },
        p,
    )
    out["evil_checkpoint.pt"] = p
    return out


def test_malicious_pickles_are_refused_everywhere(tmp_path, capsys):
    from reneg.cli import main

    marker = str(tmp_path / "PWNED")
    files = malicious_files(str(tmp_path), marker)
    # sanity: an unrestricted load of these files would run the payload
    torch.load(files["evil_zip.pt"], weights_only=False)
    assert os.path.exists(marker)
    os.unlink(marker)

    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text("{}")
    hps_cfg = tmp_path / "open_clip_config.json"
    hps_cfg.write_text(json.dumps({"model_cfg": SMALL_CLIP}))
    checked = 0
    for name, path in files.items():
        loaders = {
            "load_embedding": lambda path=path: load_embedding(path),
            "load_checkpoint": lambda path=path: load_checkpoint(path),
            "hps reward": lambda path=path: load_reward(f"hpsv2={path},config={hps_cfg}"),
            "aesthetic reward": lambda path=path: load_reward(f"aesthetic={path},clip={clip}"),
        }
        for what, fn in loaders.items():
            with pytest.raises(ValueError) as ei:
                fn()
            msg = str(ei.value)
            assert name in msg, (what, msg)
            if not name.endswith(".safetensors") and "raw_p0" not in name:
                assert "refused" in msg or "not a readable" in msg, (what, msg)
            assert not os.path.exists(marker), f"{what} ran the payload of {name}"
            checked += 1
        capsys.readouterr()
        assert main(["inspect", path]) == 2
        err = capsys.readouterr().err.strip()
        assert name in err and len(err.splitlines()) == 1, err
        assert main(["convert", path, str(tmp_path / "out.safetensors")]) == 2
        assert not os.path.exists(tmp_path / "out.safetensors")
        checked += 2
    # code-running pickles say so (not just "corrupt")
    with pytest.raises(ValueError, match="refused.*run code"):
        load_embedding(files["evil_zip.pt"])
    with pytest.raises(ValueError, match="refused.*run code"):
        load_embedding(files["evil_legacy.pt"])
    # a PickScore / CLIP folder whose weights are a malicious pytorch_model.bin (transformers' loader)
    from transformers import CLIPConfig

    hf = tmp_path / "pickscore"
    hf.mkdir()
    CLIPConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=1000
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=16,
    ).save_pretrained(str(hf))
    torch.save({"text_model.embeddings.x": _System(marker)}, hf / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickscore") as ei:
        load_reward(f"pickscore={hf}")
    assert str(hf) in str(ei.value)
    assert not os.path.exists(marker)
    checked += 1
    FIGURES["malicious files"] = len(files) + 1
    FIGURES["malicious loads refused"] = checked


# --- lying headers: no huge allocation (in a fresh process, so its peak memory means something)

HUGE_DRIVER = r"""
import json, resource, sys, time
import torch
from reneg.embedding import load_embedding
from reneg.trainer.checkpoint import load_checkpoint
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = []
for path in sys.argv[1:]:
    t0 = time.time()
    for fn in (load_embedding, load_checkpoint):
        try:
            fn(path); kind, msg = "loaded", ""
        except ValueError as e:
            kind, msg = "ValueError", str(e)
        except BaseException as e:
            kind, msg = type(e).__name__, str(e)
        out.append({"path": path, "loader": fn.__name__, "kind": kind, "msg": msg[:300],
                    "seconds": time.time() - t0})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"cases": out, "rss_growth_mb": (peak - base) / 1024}))
"""


def lying_files(folder) -> dict[str, str]:
    t = torch.zeros(1, 77, 64)
    files = {}

    def put(name, data):
        p = os.path.join(folder, name)
        with open(p, "wb") as f:
            f.write(data)
        files[name] = p

    # safetensors whose header claims a 4 TiB tensor, or a header of 2**63 bytes
    hdr = json.dumps(
        {"neg_embedding": {"dtype": "F32", "shape": [1024, 1024, 1024, 1024], "data_offsets": [0, 4 * 2**40]}}
    ).encode()
    put("tb_tensor.safetensors", struct.pack("<Q", len(hdr)) + hdr + bytes(64))
    put("huge_header.safetensors", struct.pack("<Q", 2**63 - 1) + b"{}")
    hdr = json.dumps({"neg_embedding": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 16]}}).encode()
    put("overflow_shape.safetensors", struct.pack("<Q", len(hdr)) + hdr + bytes(16))
    # legacy pickle whose storage claims 2**40 elements (4 TiB)
    buf = io.BytesIO()
    torch.save(t, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    pat = b"M" + struct.pack("<H", t.numel())
    assert pat in raw  # the first occurrence is the storage's element count in the pickle
    put("legacy_tb_storage.pt", raw.replace(pat, b"\x8a\x06" + (2**40).to_bytes(6, "little"), 1))
    # zip format whose data.pkl claims 2**40 elements
    buf = io.BytesIO()
    torch.save(t, buf)
    z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zo:
        for info in z.infolist():
            data = z.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert pat in data  # numel comes before the strides
                data = data.replace(pat, b"\x8a\x06" + (2**40).to_bytes(6, "little"), 1)
            zo.writestr(info.filename, data)
    put("zip_tb_numel.pt", out.getvalue())
    # zip bomb: a 256 MiB all-zero storage deflated into a few hundred KiB
    block = bytes(16 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    stream = chunk * 16 + c.flush()
    crc = 0
    for _ in range(16):
        crc = zlib.crc32(block, crc)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zo:
        for info in z.infolist():
            if "/data/" in info.filename:
                continue
            zo.writestr(info.filename, z.read(info.filename))
    raw_zip = out.getvalue()
    # append a deflated data/0 entry by hand (local header + data + central entry)
    name = [i.filename for i in z.infolist() if "/data/" in i.filename][0].encode()
    zi = zipfile.ZipFile(io.BytesIO(raw_zip))
    body_end = raw_zip.find(b"PK\x01\x02")  # the local entries end where the central directory starts
    local = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(stream), 256 << 20, len(name), 0)
    central_entries = raw_zip[body_end : raw_zip.find(b"PK\x05\x06")]
    new_offset = body_end
    central = (
        struct.pack(
            "<4s6H3I5H2I",
            b"PK\x01\x02",
            20,
            20,
            0,
            8,
            0,
            0,
            crc,
            len(stream),
            256 << 20,
            len(name),
            0,
            0,
            0,
            0,
            0,
            new_offset,
        )
        + name
    )
    body = raw_zip[:body_end] + local + name + stream
    cd = central_entries + central
    eocd = struct.pack(
        "<4s4H2IH", b"PK\x05\x06", 0, 0, len(zi.infolist()) + 1, len(zi.infolist()) + 1, len(cd), len(body), 0
    )
    put("zip_bomb.pt", body + cd + eocd)
    return files


def test_lying_headers_cause_no_huge_allocation(tmp_path):
    files = lying_files(str(tmp_path))
    # the bomb is real: a well-formed archive whose storage inflates to 256 MiB of zeros
    with zipfile.ZipFile(files["zip_bomb.pt"]) as z:
        assert sum(i.file_size for i in z.infolist()) >= 256 << 20
        assert os.path.getsize(files["zip_bomb.pt"]) < 2 << 20
        entry = [i for i in z.infolist() if "/data/" in i.filename][0]
        with z.open(entry) as f:
            assert f.read(1 << 20) == bytes(1 << 20)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-c", HUGE_DRIVER, *files.values()], capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for case in res["cases"]:
        name = os.path.basename(case["path"])
        assert case["kind"] == "ValueError", case
        assert name in case["msg"], case
        assert case["seconds"] < 5, case
    assert res["rss_growth_mb"] < 150, res["rss_growth_mb"]
    bomb = [c for c in res["cases"] if c["path"].endswith("zip_bomb.pt") and c["loader"] == "load_embedding"]
    assert "decompression bomb" in bomb[0]["msg"], bomb
    FIGURES["lying-header files"] = len(files)


def test_zz_report_fuzz_figures():
    """Prints the figures for the closing note (run with -s)."""
    total = sum(v for k, v in FIGURES.items() if not k.startswith("malicious") and k != "lying-header files")
    print(f"\nfuzzed files: {total} mutated ({FIGURES}); seed {SEED}")
    assert total > 0 or not FIGURES
