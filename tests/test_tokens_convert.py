"""``reneg convert SRC DST --to tokens N --model M`` (token vectors fitted to an output-space embedding, with a
report of how close their encoding came) and ``reneg inspect`` on textual-inversion files."""

from __future__ import annotations

import json

import pytest
import torch

from reneg.embedding import NegEmbedding, save_embedding
from reneg.tokens import TokenEncoder, TokenNegative, fit_report, load_tokens, save_tokens


def test_convert_to_tokens_fits_the_embedding_and_says_how_close(tmp_path, capsys, tiny_pipeline_dir, tiny_backend):
    from reneg.cli import main

    enc = TokenEncoder(tiny_backend)
    # a reachable target: a text's encoding (4 token vectors give it exactly); the fit starts at the empty prompt
    text = "a blue square"
    rows = tiny_backend.encode_prompts([text]).crossattn.detach()
    src = save_embedding(tmp_path / "emb.safetensors", NegEmbedding(rows, "tiny"), rewards="hpsv2")
    dst = str(tmp_path / "neg.pt")
    conv = ["convert", src, dst, "--to", "tokens", "4", "--model", tiny_pipeline_dir, "--fit-steps", "80"]
    assert main(conv + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["tokens"] == 4 and rep["relative_error"] < 0.5 * rep["null_relative_error"], rep
    assert 0.5 < rep["kept"] <= 1 and rep["cosine"] > rep["null_cosine"]
    tok = load_tokens(dst, expected_family="tiny")
    assert tok.count == 4 and tok.format == "a1111-pt"
    assert tok.metadata["source"] == "emb.safetensors" and tok.metadata["source_rewards"] == "hpsv2"
    # the report is the written vectors' own: their encoding, measured again
    again = fit_report(enc.encode(tok.flat())[0].detach(), rows)
    assert abs(again["relative_error"] - rep["relative_error"]) < 1e-5
    assert abs(float(tok.metadata["fit_relative_error"]) - rep["relative_error"]) < 1e-5
    # the readable report, and the refusals
    assert main(conv[:-2] + ["--fit-steps", "5", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "wrote " in out and "relative error" in out and "kept" in out
    assert main(conv) == 2 and "already exists" in capsys.readouterr().err
    assert main(["convert", src, dst, "--to", "tokens", "4", "--overwrite"]) == 2
    assert "needs --model" in capsys.readouterr().err
    assert main(["convert", src, dst, "--to", "words", "4", "--overwrite"]) == 2
    assert "expected --to tokens N" in capsys.readouterr().err
    bad = conv[:5] + ["76"] + conv[6:] + ["--overwrite"]
    assert main(bad) == 2 and "1 to 75" in capsys.readouterr().err
    xl = save_embedding(
        tmp_path / "xl.safetensors", NegEmbedding(torch.zeros(1, 77, 2048), "sdxl", torch.zeros(1, 1280))
    )
    assert main(["convert", xl, str(tmp_path / "x.pt"), "--to", "tokens", "2", "--model", tiny_pipeline_dir]) == 2
    assert "xl.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["pt", "safetensors", "sdxl"])
def test_inspect_reads_token_files(tmp_path, capsys, kind):
    from reneg.cli import main

    fam, width = ("sdxl", 2048) if kind == "sdxl" else ("sd1", 768)
    path = str(tmp_path / f"neg.{'pt' if kind == 'pt' else 'safetensors'}")
    save_tokens(path, TokenNegative.from_flat(torch.randn(3, width) * 0.02, fam, metadata={"how": "a test"}))
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "textual-inversion file" in out and f"family  {fam}" in out and "3 negative token vectors" in out
    assert "how: a test" in out
    assert main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "tokens" and info["tokens"] == 3 and info["family"] == fam
    want = {"clip_l": [3, 768], "clip_g": [3, 1280]} if kind == "sdxl" else {"emb_params": [3, 768]}
    assert info["vectors"] == want


@pytest.mark.slow
def test_convert_sdxl_fits_both_encoders_and_the_pooled_vector(tmp_path, tiny_sdxl_dir):
    from reneg.backends.loading import load_diffusers
    from reneg.tokens import convert_to_tokens

    xl = load_diffusers(tiny_sdxl_dir)
    c = xl.encode_prompts(["a blue square"])
    src = save_embedding(tmp_path / "xl.safetensors", NegEmbedding(c.crossattn.detach(), "sdxl", c.pooled.detach()))
    with pytest.raises(ValueError, match=r"x\.pt: token files are written as \.safetensors"):
        convert_to_tokens(src, str(tmp_path / "x.pt"), xl, 3, steps=2)
    tok, rep = convert_to_tokens(src, str(tmp_path / "x.safetensors"), xl, 3, steps=40)
    assert set(tok.vectors) == {"clip_l", "clip_g"} and tok.count == 3
    assert "pooled_relative_error" in rep and rep["relative_error"] < rep["null_relative_error"]
    assert load_tokens(str(tmp_path / "x.safetensors"), expected_family="sdxl").count == 3
    # the report's baseline is the empty prompt's encoding: an embedding equal to it is
    # 0 away (bigG pads with 0, so the end-token vectors training starts from encode to something else)
    null, null_pooled = xl.null_embedding()
    empty = save_embedding(tmp_path / "empty.safetensors", NegEmbedding(null, "sdxl", null_pooled))
    _, rep = convert_to_tokens(empty, str(tmp_path / "e.safetensors"), xl, 3, steps=1)
    assert rep["null_relative_error"] < 1e-6 and rep["null_cosine"] > 1 - 1e-6, rep
