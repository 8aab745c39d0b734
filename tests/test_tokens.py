"""Negative tokens (reneg/tokens.py): the encoding convention, the files the UIs read, and diffusers'
real ``load_textual_inversion`` giving the same conditioning for ``negative_prompt="<name>"``."""

from __future__ import annotations

import pytest
import torch

from reneg.tokens import (
    TokenEncoder,
    TokenError,
    TokenNegative,
    fit_report,
    fit_tokens,
    load_tokens,
    save_tokens,
)


@pytest.fixture(scope="module")
def enc(tiny_backend):
    return TokenEncoder(tiny_backend)


def _sd_pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_texts_token_vectors_give_exactly_its_encoding(enc, tiny_backend):
    text = "a red circle"
    k = enc.text_token_count(text)
    want = tiny_backend.encode_prompts([text]).crossattn
    for n in (k, k + 3):  # more vectors than tokens: the end token's vector, which is also the padding here
        rows, pooled = enc.encode(enc.from_text(text, n))
        assert pooled is None and torch.equal(rows, want)
    assert torch.equal(enc.encode(enc.null(4))[0], tiny_backend.null_embedding()[0])
    # ids: start, placeholders, end, padding (the tokenizer's own)
    ids = enc.ids(2)[0].tolist()
    assert ids[:4] == [49406, 0, 0, 49407] and len(ids) == 77
    with pytest.raises(TokenError, match="1 to 75"):
        enc.ids(76)


def test_gradients_reach_the_vectors_and_the_encoder_stays_frozen(enc):
    v = enc.null(3).requires_grad_(True)
    rows, _ = enc.encode(v)
    rows.pow(2).sum().backward()
    assert v.grad is not None and float(v.grad.abs().sum()) > 0
    assert all(p.grad is None for p in enc.pairs[0][1].parameters())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_sd_files_load_in_diffusers_and_give_our_conditioning(tmp_path, tiny_pipeline_dir, enc, suffix):
    torch.manual_seed(0)
    v = torch.randn(5, 64) * 0.05
    path = save_tokens(tmp_path / f"rn{suffix}", TokenNegative.from_flat(v, "tiny", metadata={"how": "test"}), step=7)
    back = load_tokens(path, expected_family="tiny")
    assert back.count == 5 and torch.equal(back.flat(), v) and back.metadata["how"] == "test"
    assert back.metadata["trained_steps"] == "7" and back.metadata["family"] == "tiny"
    if suffix == ".pt":  # A1111's fields, readable with weights_only=True
        data = torch.load(path, weights_only=True)
        assert set(data) >= {"string_to_token", "string_to_param", "name", "step"} and data["name"] == "rn"
        assert data["step"] == 7 and torch.equal(data["string_to_param"]["*"], v)
    else:
        from safetensors.torch import load_file

        assert list(load_file(path)) == ["emb_params"]  # A1111 reads a one-tensor file
    rows, _ = enc.encode(v)
    pipe = _sd_pipe(tiny_pipeline_dir)
    pipe.load_textual_inversion(path, token="<rn>")
    _, neg = pipe.encode_prompt("a red circle", "cpu", 1, True, negative_prompt="<rn>")
    assert torch.allclose(neg, rows, atol=1e-6)
    # and the negative changes the image: the denoised latent differs from the empty negative's
    kw = dict(prompt="a red circle", num_inference_steps=3, output_type="latent", height=16, width=16)
    a = pipe(negative_prompt="<rn>", generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe(negative_prompt="", generator=torch.Generator().manual_seed(0), **kw).images
    assert float((a - b).abs().max()) > 1e-4


def test_sdxl_file_loads_in_diffusers_and_gives_our_conditioning(tmp_path, tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from reneg.backends.loading import load_diffusers

    xl = load_diffusers(tiny_sdxl_dir)
    enc = TokenEncoder(xl)
    text = "a red circle"
    c = xl.encode_prompts([text])
    rows, pooled = enc.encode(enc.from_text(text, enc.text_token_count(text)))
    assert torch.equal(rows, c.crossattn) and torch.equal(pooled, c.pooled)
    torch.manual_seed(0)
    v = torch.randn(4, 2048) * 0.02
    path = save_tokens(tmp_path / "xl.safetensors", TokenNegative.from_flat(v, "sdxl"))
    sd = load_file(path)
    assert set(sd) == {"clip_l", "clip_g"} and sd["clip_l"].shape == (4, 768) and sd["clip_g"].shape == (4, 1280)
    rows, pooled = enc.encode(v)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_textual_inversion(sd["clip_l"], token="<xl>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(
        sd["clip_g"], token="<xl>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    _, neg, _, neg_pooled = pipe.encode_prompt(
        text, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt="<xl>"
    )
    assert torch.allclose(neg, rows, atol=1e-6) and torch.allclose(neg_pooled, pooled, atol=1e-6)
    # a text encoder whose config still says eos_token_id 2 (the released SDXL folders) pools at the largest
    # id, which with added tokens is the last of them: the rows stay equal, the pooled vector does not
    pipe.text_encoder_2.text_model.eos_token_id = 2
    _, neg2, _, neg_pooled2 = pipe.encode_prompt(
        text, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt="<xl>"
    )
    assert torch.allclose(neg2, rows, atol=1e-6) and not torch.allclose(neg_pooled2, pooled, atol=1e-3)


def test_third_party_files_and_refusals(tmp_path):
    from safetensors.torch import save_file

    v = torch.randn(3, 768)
    torch.save({"<easy>": v}, tmp_path / "learned_embeds.bin")  # diffusers' training script
    t = load_tokens(tmp_path / "learned_embeds.bin")
    assert t.family == "sd1" and t.count == 3 and t.name == "easy"
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, tmp_path / "negxl.safetensors")
    assert load_tokens(tmp_path / "negxl.safetensors").family == "sdxl"
    save_file({"emb_params": torch.randn(8, 1024)}, tmp_path / "sd2.safetensors")
    assert load_tokens(tmp_path / "sd2.safetensors").family == "sd2"
    with pytest.raises(
        TokenError, match=r"sd1\.safetensors: a sd1 textual-inversion file \(768-wide.*sdxl.*768 \+ 1280"
    ):
        save_file({"emb_params": v}, tmp_path / "sd1.safetensors")
        load_tokens(tmp_path / "sd1.safetensors", expected_family="sdxl")
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(3, 1280)}, tmp_path / "bad.safetensors")
    with pytest.raises(TokenError, match="bad.safetensors: clip_l and clip_g must hold the same number"):
        load_tokens(tmp_path / "bad.safetensors")
    save_file({"emb_params": torch.randn(2, 100)}, tmp_path / "odd.safetensors")
    with pytest.raises(TokenError, match="odd.safetensors: token vectors of width 100 fit no family"):
        load_tokens(tmp_path / "odd.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04not a torch file")
    with pytest.raises(TokenError, match="junk.pt"):
        load_tokens(tmp_path / "junk.pt")
    with pytest.raises(TokenError, match="SDXL token files are written as .safetensors"):
        save_tokens(tmp_path / "x.pt", TokenNegative.from_flat(torch.zeros(1, 2048), "sdxl"))


def test_fit_tokens_recovers_a_reachable_target(enc):
    torch.manual_seed(1)
    target, _ = enc.encode(enc.from_text("a blue square", 4))
    start = enc.null(4)
    before = fit_report(enc.encode(start)[0].detach(), target.detach())
    vec, rep = fit_tokens(enc, target.detach(), 4, steps=60, init=start)
    assert vec.shape == (4, 64) and len(rep["row_cosine"]) == 77
    assert rep["relative_error"] < 0.5 * before["relative_error"], (rep["relative_error"], before["relative_error"])


def test_eval_reads_a_token_file_as_the_model_encodes_its_name(
    tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, tiny_backend
):
    """``reneg eval --negative FILE.pt``: a negative-token file is encoded through the model's own text encoder
    (what a UI gives the model for the file's name), so its images and scores are those of its encoded
    embedding; a token file of another family is refused before the first image."""
    from reneg.embedding import NegEmbedding, save_embedding
    from reneg.evaluation import run as ev
    from reneg.evaluation import scoring
    from reneg.evaluation.config import EvalConfig, EvalError

    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(6)) * 0.02
    tok = save_tokens(tmp_path / "neg4.pt", TokenNegative.from_flat(v, "tiny"))
    rows, _ = TokenEncoder(tiny_backend).encode(v)
    twin = save_embedding(str(tmp_path / "twin.safetensors"), NegEmbedding(rows.detach(), "tiny"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")

    def cfg(negatives, out):
        return EvalConfig(model=tiny_pipeline_dir, rewards=[f"hpsv2={tiny_hps_ckpt}"], prompts=str(prompts),
                          negatives=negatives, out=str(tmp_path / out), sampling_steps=3, guidance=5.0,
                          resolution=16, batch=2, seed=7, progress=False, device="cpu")  # fmt: skip

    summary = ev.run_eval(cfg([f"tok={tok}", f"twin={twin}", "null"], "ev"), log=lambda m: None)
    assert summary["images"] == {"tok": 2, "twin": 2, "null": 2}
    by = {
        (r["prompt_index"], r["negative"]): r["score"]
        for r in scoring.read_scores_csv(str(tmp_path / "ev" / "scores.csv"))
    }
    for i in range(2):
        assert by[(i, "tok")] == pytest.approx(by[(i, "twin")], abs=1e-6)
        assert by[(i, "tok")] != pytest.approx(by[(i, "null")], abs=1e-6)
    xl = save_tokens(tmp_path / "xl.safetensors", TokenNegative.from_flat(torch.zeros(2, 2048), "sdxl"))
    with pytest.raises(EvalError, match=r"--negative xl: .*sdxl"):
        ev.run_eval(cfg([f"xl={xl}"], "ev2"), log=lambda m: None)
