"""Embedding files: our format, the paper's pickles, foreign formats, validation, CLI."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from reneg.cli import main
from reneg.embedding import EmbeddingError, NegEmbedding, convert, load_embedding, save_embedding

OFFICIAL = {
    "sd1.4_reneg_emb.bin": ("sd1", [1, 77, 768]),
    "sd1.5_reneg_emb.bin": ("sd1", [1, 77, 768]),
    "sd2.1_reneg_emb.bin": ("sd2", [1, 77, 1024]),
    "pixart-alpha_reneg_emb.bin": ("pixart", [1, 120, 4096]),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_embeddings_load_and_round_trip(shared_data, tmp_path, name):
    src = shared_data / "reneg-official" / name
    family, shape = OFFICIAL[name]
    emb = load_embedding(src)
    assert emb.family == family and list(emb.tensor.shape) == shape
    assert emb.format == "torch-tensor" and emb.tensor.dtype == torch.float32
    dst = tmp_path / "out.safetensors"
    back = convert(str(src), str(dst))
    assert back.family == family and back.format == "reneg"
    assert torch.equal(back.tensor, emb.tensor)  # bit for bit
    assert back.metadata["kind"] == "global" and back.metadata["source_file"] == name


def test_inspect_json_cli(shared_data, capsys):
    assert main(["inspect", str(shared_data / "reneg-official" / "sd2.1_reneg_emb.bin"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sd2" and info["shape"] == [1, 77, 1024]
    for key in ("path", "format", "family", "shape", "dtype", "metadata"):
        assert key in info
    assert info["dtype"] == "float32"


def test_convert_cli_keeps_bits_and_refuses_overwrite(tmp_path, capsys):
    t = torch.randn(1, 77, 768, dtype=torch.float16)
    src = tmp_path / "neg.pt"
    torch.save(t, src)
    dst = tmp_path / "neg.safetensors"
    assert main(["convert", str(src), str(dst)]) == 0
    out = load_embedding(dst)
    assert out.tensor.dtype == torch.float16 and torch.equal(out.tensor, t)
    assert main(["convert", str(src), str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "x.safetensors"), "--family", "sd2"]) == 2


def test_our_format_metadata_round_trip(tmp_path):
    t = torch.randn(1, 77, 1024)
    path = tmp_path / "e.safetensors"
    save_embedding(
        path, NegEmbedding(t, "sd2"), kind="per-sample", prompt="a cat", seed=7, rewards=["hpsv2.1=x"], lr=5e-3
    )
    e = load_embedding(path)
    m = e.metadata
    assert e.format == "reneg" and e.family == "sd2" and torch.equal(e.tensor, t)
    assert m["kind"] == "per-sample" and m["prompt"] == "a cat" and m["seed"] == "7"
    assert m["hidden_size"] == "1024" and m["token_count"] == "77" and m["format_version"] == "1"
    assert json.loads(m["rewards"]) == ["hpsv2.1=x"] and "created" in m and "reneg_version" in m
    with pytest.raises(FileExistsError):
        save_embedding(path, NegEmbedding(t, "sd2"))


def test_sdxl_pooled_round_trip(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_embedding(path, NegEmbedding(torch.randn(1, 77, 2048), "sdxl", torch.randn(1, 1280)))
    e = load_embedding(path)
    assert e.family == "sdxl" and list(e.pooled.shape) == [1, 1280]


def test_foreign_formats(tmp_path):
    t = torch.randn(1, 77, 768)
    p1 = tmp_path / "diffusers.pt"
    torch.save({"negative_prompt_embeds": t}, p1)
    p2 = tmp_path / "any.safetensors"
    save_file({"whatever": t[0].contiguous()}, str(p2))  # [77, 768] under any key
    for p in (p1, p2):
        e = load_embedding(p)
        assert e.family == "sd1" and torch.equal(e.tensor, t)


def _write(tmp_path, name, obj):
    p = tmp_path / name
    torch.save(obj, p)
    return p


@pytest.mark.parametrize(
    "obj, needle",
    [
        (torch.randn(77), "expected a tensor of shape [1, tokens, hidden]"),
        (torch.randn(2, 77, 768), "expected a tensor of shape"),
        (torch.full((1, 77, 768), float("nan")), "expected finite values"),
        (torch.randn(1, 77, 500), "unknown hidden size 500"),
        (torch.randn(1, 70, 768), "needs 77 token rows, found 70"),
        (torch.zeros(1, 77, 768, dtype=torch.long), "floating-point"),
        ({"a": torch.randn(1, 77, 768), "b": torch.randn(3)}, "expected a tensor or a dict"),
    ],
)
def test_bad_tensors_are_refused_with_the_file_named(tmp_path, obj, needle):
    p = _write(tmp_path, "bad.pt", obj)
    with pytest.raises(EmbeddingError) as e:
        load_embedding(p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_truncated_files(tmp_path):
    t = torch.randn(1, 77, 768)
    good = tmp_path / "good.safetensors"
    save_embedding(good, NegEmbedding(t, "sd1"))
    raw = good.read_bytes()
    for n in (0, 5, 20, len(raw) // 2, len(raw) - 1):
        p = tmp_path / f"trunc{n}.safetensors"
        p.write_bytes(raw[:n])
        with pytest.raises(EmbeddingError, match="trunc"):
            load_embedding(p)
    pk = _write(tmp_path, "good.pt", t).read_bytes()
    p = tmp_path / "trunc.pt"
    p.write_bytes(pk[: len(pk) // 2])
    with pytest.raises(EmbeddingError, match="trunc.pt"):
        load_embedding(p)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.bin"
    torch.save({"neg_embedding": torch.randn(1, 77, 768), "x": _Evil(marker)}, p)
    with pytest.raises(EmbeddingError, match="refused"):
        load_embedding(p)
    assert not marker.exists()
    # a raw (non-zip) pickle too
    p2 = tmp_path / "evil2.pt"
    p2.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(EmbeddingError):
        load_embedding(p2)
    assert not marker.exists()


def test_lying_safetensors_header(tmp_path):
    import struct

    header = json.dumps(
        {"neg_embedding": {"dtype": "F32", "shape": [1, 77, 10**12], "data_offsets": [0, 4 * 77 * 10**12]}}
    ).encode()
    p = tmp_path / "liar.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(EmbeddingError, match="liar.safetensors.*invalid"):
        load_embedding(p)
    p.write_bytes(struct.pack("<Q", 10**15) + b"{}")
    with pytest.raises(EmbeddingError, match="claims"):
        load_embedding(p)


def test_expected_family_names_both(tmp_path):
    p = tmp_path / "e.safetensors"
    save_embedding(p, NegEmbedding(torch.randn(1, 77, 768), "sd1"))
    with pytest.raises(EmbeddingError, match="sd1 embedding.*model in use is sd2"):
        load_embedding(p, expected_family="sd2")


def test_core_embedding_module_imports_only_torch_and_safetensors():
    code = (
        "import sys, reneg.embedding\n"
        "heavy = [m for m in ('diffusers', 'transformers', 'open_clip', 'accelerate') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
