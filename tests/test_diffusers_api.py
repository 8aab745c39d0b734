"""reneg.load_negative: a ReNeg file as a diffusers pipeline's keyword arguments, checked on the real
diffusers pipelines (tiny models saved in the real layouts): the pipeline called with them gives the
image it gives with the embedding passed by hand, and the image our own sampler gives."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import reneg
from reneg.embedding import EmbeddingError, NegEmbedding, save_embedding
from reneg.sampling import initial_latent, sample, to_vp


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _noise(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _sd_pipe(folder, **kw):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None, **kw)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, noise, steps=4, guidance=7.5, **kw):
    out = pipe(
        latents=noise.clone(), num_inference_steps=steps, guidance_scale=guidance, eta=0.0, output_type="latent", **kw
    )
    return out.frames if hasattr(out, "frames") else out.images


def _file(tmp_path, name, tensor, family, **kw):
    return save_embedding(str(tmp_path / name), NegEmbedding(tensor, family, **kw))


@pytest.fixture(scope="module")
def sd(tiny_pipeline_dir):
    return _sd_pipe(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def sd_neg():
    return _noise(1, 77, 64, seed=1) * 0.5


def test_sd_kwargs_give_the_hand_passed_image_and_our_samplers(tmp_path, sd, sd_neg, tiny_backend):
    path = _file(tmp_path, "neg.safetensors", sd_neg, "tiny")
    bin_path = tmp_path / "neg.bin"  # the paper's format: a bare tensor saved with torch.save
    torch.save(sd_neg, bin_path)
    prompts = ["a red circle", "a blue square"]
    kw = reneg.load_negative(sd, path, prompts)
    assert set(kw) == {"prompt", "negative_prompt_embeds"} and kw["prompt"] == prompts
    assert kw["negative_prompt_embeds"].shape == (2, 77, 64)
    assert kw["negative_prompt_embeds"].dtype == torch.float32 and torch.equal(
        kw["negative_prompt_embeds"][1], sd_neg[0]
    )
    assert torch.equal(
        reneg.load_negative(sd, bin_path, prompts)["negative_prompt_embeds"], kw["negative_prompt_embeds"]
    )

    noise = _noise(4, 4, 8, 8)
    got = _latents(sd, noise, num_images_per_prompt=2, **kw)
    hand = _latents(sd, noise, prompt=prompts, num_images_per_prompt=2, negative_prompt_embeds=sd_neg.expand(2, -1, -1))
    assert torch.equal(got, hand)
    null = _latents(sd, noise, prompt=prompts, num_images_per_prompt=2, negative_prompt=["", ""])
    assert _rel(got, null) > 1e-3  # the file does change the image

    # our sampler, which training and eval use (its match to StableDiffusionPipeline is tested on its own)
    noise2 = _noise(2, 4, 8, 8, seed=2)
    ref = _latents(sd, noise2, steps=6, **kw)
    sig = tiny_backend.schedule(6)
    cond = tiny_backend.encode_prompts(prompts)
    x, _ = sample(
        tiny_backend.denoiser, initial_latent(noise2, sig[0]), sig, cond, tiny_backend.negative_cond(sd_neg), 7.5
    )
    assert _rel(to_vp(x, sig[-1]), ref) < 1e-4

    # strength: 0 is the pipeline's own negative_prompt="", between is the blend with it
    zero = reneg.load_negative(sd, path, prompts, strength=0)
    assert torch.equal(
        _latents(sd, noise2, steps=6, **zero),
        _latents(sd, noise2, steps=6, prompt=prompts, negative_prompt=["", ""]),
    )
    with torch.no_grad():
        _, e = sd.encode_prompt("", "cpu", 1, True, negative_prompt="")
    half = reneg.load_negative(sd, path, prompts, strength=0.5)["negative_prompt_embeds"]
    assert torch.allclose(half, torch.lerp(e, sd_neg, 0.5).expand(2, -1, -1), atol=1e-6)

    # prompt_embeds of a long prompt (77 k rows, as prompt-weighting tools make them): batch and rows follow it
    pe = torch.zeros(3, 154, 64)
    long = reneg.load_negative(sd, path, prompt_embeds=pe)["negative_prompt_embeds"]
    assert long.shape == (3, 154, 64) and torch.equal(long[2], sd_neg[0].repeat(2, 1))
    assert set(reneg.load_negative(sd, path, prompt_embeds=pe)) == {"negative_prompt_embeds"}
    assert reneg.load_negative(sd, path)["negative_prompt_embeds"].shape == (1, 77, 64)  # no prompt: batch 1


def test_sdxl_kwargs_carry_the_pooled_vector(tmp_path, tiny_sdxl_dir):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from reneg.backends.loading import load_diffusers

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    neg, pooled = _noise(1, 77, 2048, seed=3) * 0.5, _noise(1, 1280, seed=4) * 0.5
    path = _file(tmp_path, "xl.safetensors", neg, "sdxl", pooled=pooled)
    prompts = ["a red circle", "a blue square"]
    kw = reneg.load_negative(pipe, path, prompts)
    assert set(kw) == {"prompt", "negative_prompt_embeds", "negative_pooled_prompt_embeds"}
    assert kw["negative_prompt_embeds"].shape == (2, 77, 2048) and torch.equal(
        kw["negative_pooled_prompt_embeds"][1], pooled[0]
    )
    noise = _noise(2, 4, 8, 8, seed=5)
    common = dict(height=16, width=16, steps=6)
    got = _latents(pipe, noise, **common, **kw)
    hand = _latents(
        pipe,
        noise,
        **common,
        prompt=prompts,
        negative_prompt_embeds=neg.expand(2, -1, -1),
        negative_pooled_prompt_embeds=pooled.expand(2, -1),
    )
    assert torch.equal(got, hand)
    xl = load_diffusers(tiny_sdxl_dir)
    sig = xl.schedule(6)
    x, _ = sample(
        xl.denoiser, initial_latent(noise, sig[0]), sig, xl.encode_prompts(prompts), xl.negative_cond(neg, pooled), 7.5
    )
    assert _rel(to_vp(x, sig[-1]), got) < 1e-4

    # a file without a pooled vector (a bare tensor) gets the empty prompt's, as the UIs keep theirs
    bare = tmp_path / "xl.bin"
    torch.save(neg, bare)
    with torch.no_grad():
        _, _, _, empty_pooled = pipe.encode_prompt("", device="cpu", negative_prompt="")
    kw2 = reneg.load_negative(pipe, bare, "a cat")
    assert torch.equal(kw2["negative_prompt_embeds"], neg) and torch.allclose(
        kw2["negative_pooled_prompt_embeds"], empty_pooled
    )
    half = reneg.load_negative(pipe, path, "a cat", strength=0.5)["negative_pooled_prompt_embeds"]
    assert torch.allclose(half, torch.lerp(empty_pooled, pooled, 0.5), atol=1e-6)


def _pixart_pipe(folder, sigma=False):
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    pipe = (PixArtSigmaPipeline if sigma else PixArtAlphaPipeline).from_pretrained(folder, local_files_only=True)
    # "leading" spacing and no clipping: where diffusers' DDIM and our sampler are the same sampler
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, timestep_spacing="leading")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixart_latents(pipe, noise, **kw):
    return _latents(
        pipe, noise, steps=6, guidance=4.5, height=16, width=16, use_resolution_binning=False, clean_caption=False, **kw
    )


def test_pixart_kwargs_carry_the_mask_and_fit_sigmas_300_rows(tmp_path, tiny_pixart_dir):
    from reneg.backends.loading import load_diffusers
    from reneg.tiny import build_tiny_pixart

    rows = _noise(1, 120, 4096, seed=6) * 0.05
    mask = torch.zeros(1, 120, dtype=torch.long)
    mask[0, :3] = 1
    rows[:, 3:] = 0
    path = _file(tmp_path, "t5.safetensors", rows, "pixart", attention_mask=mask)
    pipe = _pixart_pipe(tiny_pixart_dir)
    prompts = ["a red circle", "a blue square"]
    kw = reneg.load_negative(pipe, path, prompts)
    # PixArt refuses a prompt text beside negative_prompt_embeds: the prompt comes as its own encoding
    # (and its default negative_prompt="" is set aside: the pipeline refuses it beside negative_prompt_embeds)
    assert set(kw) == {
        "prompt_embeds",
        "prompt_attention_mask",
        "negative_prompt",
        "negative_prompt_embeds",
        "negative_prompt_attention_mask",
    }
    assert kw["negative_prompt"] is None
    with torch.no_grad():  # as inside the pipeline's call (with autograd on, T5 rounds differently)
        pe, pm, _, _ = pipe.encode_prompt(prompts, False, device="cpu", clean_caption=False)
    assert torch.equal(kw["prompt_embeds"], pe) and torch.equal(kw["prompt_attention_mask"], pm)
    assert (
        kw["negative_prompt_embeds"].shape == (2, 120, 4096)
        and kw["negative_prompt_attention_mask"].tolist() == mask.expand(2, -1).tolist()
    )
    noise = _noise(2, 4, 8, 8, seed=7)
    got = _pixart_latents(pipe, noise, **kw)
    hand = _pixart_latents(
        pipe,
        noise,
        prompt_embeds=pe,
        prompt_attention_mask=pm,
        negative_prompt=None,
        negative_prompt_embeds=rows.expand(2, -1, -1),
        negative_prompt_attention_mask=mask.expand(2, -1),
    )
    assert torch.equal(got, hand)
    alpha = load_diffusers(tiny_pixart_dir)
    alpha.scheduler_config = dict(alpha.scheduler_config, timestep_spacing="leading")
    sig = alpha.schedule(6)
    x, _ = sample(
        alpha.denoiser,
        initial_latent(noise, sig[0]),
        sig,
        alpha.encode_prompts(prompts),
        alpha.negative_cond(rows, mask=mask),
        4.5,
    )
    assert _rel(to_vp(x, sig[-1]), got) < 1e-4

    # T5 rows blend with the empty prompt only where both read the same rows (here: one row)
    with pytest.raises(
        ValueError, match=r"t5\.safetensors: strength 0\.5: its attention mask reads 3 rows .* empty prompt reads 1"
    ):
        reneg.load_negative(pipe, path, prompts, strength=0.5)
    one = _file(tmp_path, "one.safetensors", rows * (torch.arange(120) < 1)[None, :, None], "pixart")
    with torch.no_grad():
        _, _, e, em = pipe.encode_prompt("", negative_prompt="", device="cpu", clean_caption=False)
    half = reneg.load_negative(pipe, one, "a cat", strength=0.5)
    assert torch.equal(half["negative_prompt_attention_mask"], em)
    assert torch.allclose(half["negative_prompt_embeds"][:, :1], torch.lerp(e[:, :1], rows[:, :1], 0.5), atol=1e-6)

    # PixArt-sigma encodes 300 rows: the 120-row file is padded with rows its mask leaves out
    sigma_dir = build_tiny_pixart(str(tmp_path / "sigma"), seed=1, sigma=True)
    spipe = _pixart_pipe(sigma_dir, sigma=True)
    skw = reneg.load_negative(spipe, path, prompts)
    assert (
        skw["negative_prompt_embeds"].shape == (2, 300, 4096) and int(skw["negative_prompt_attention_mask"].sum()) == 6
    )
    assert (
        torch.equal(skw["negative_prompt_embeds"][:, :120], rows.expand(2, -1, -1))
        and not skw["negative_prompt_embeds"][:, 120:].any()
    )
    sgot = _pixart_latents(spipe, noise, **skw)
    sg = load_diffusers(sigma_dir)
    sg.scheduler_config = dict(sg.scheduler_config, timestep_spacing="leading")
    x, _ = sample(
        sg.denoiser,
        initial_latent(noise, sig[0]),
        sg.schedule(6),
        sg.encode_prompts(prompts),
        sg.negative_cond(rows, mask=mask),
        4.5,
    )
    assert _rel(to_vp(x, sig[-1]), sgot) < 1e-4
    # a 300-row file whose mask reads more than PixArt-alpha's 120 rows is refused
    wide = torch.zeros(1, 300, dtype=torch.long)
    wide[0, :200] = 1
    big = _file(tmp_path, "big.safetensors", _noise(1, 300, 4096) * 0.05, "pixart-sigma", attention_mask=wide)
    with pytest.raises(
        ValueError,
        match=r"big\.safetensors: its attention mask reads 200 rows, but this pipeline encodes prompts to 120",
    ):
        reneg.load_negative(pipe, big, prompts)
    assert reneg.load_negative(spipe, big, prompts)["negative_prompt_embeds"].shape == (2, 300, 4096)


def test_the_papers_pixart_file(shared_data, tiny_pixart_dir):
    """The authors' PixArt-alpha .bin (no mask stored): its one read row, the empty prompt's mask."""
    path = shared_data / "reneg-official" / "pixart-alpha_reneg_emb.bin"
    if not path.is_file():
        pytest.skip("the paper's PixArt-alpha embedding is not in the shared data folder")
    from reneg.embedding import load_embedding

    emb = load_embedding(path)
    pipe = _pixart_pipe(tiny_pixart_dir)
    kw = reneg.load_negative(pipe, path, "a red circle")
    assert kw["negative_prompt_attention_mask"].tolist() == [[1] + [0] * 119]
    assert torch.equal(kw["negative_prompt_embeds"][:, :1], emb.tensor[:, :1].float())
    noise = _noise(1, 4, 8, 8, seed=9)
    got = _pixart_latents(pipe, noise, **kw)
    hand = _pixart_latents(
        pipe,
        noise,
        prompt_embeds=kw["prompt_embeds"],
        prompt_attention_mask=kw["prompt_attention_mask"],
        negative_prompt=None,
        negative_prompt_embeds=emb.tensor.float(),
        negative_prompt_attention_mask=emb.mask(),
    )
    assert _rel(got, hand) < 1e-6  # the file's masked rows are zeroed: the transformer ignores them either way
    assert _rel(got, _pixart_latents(pipe, noise, prompt="a red circle")) > 1e-3


@pytest.mark.slow  # builds a 150 MB SD folder (CLIP-L's 768-wide token table)
def test_the_papers_sd15_file_on_an_sd1_pipeline(shared_data, tmp_path):
    path = shared_data / "reneg-official" / "sd1.5_reneg_emb.bin"
    if not path.is_file():
        pytest.skip("the paper's SD1.5 embedding is not in the shared data folder")
    from reneg.embedding import load_embedding
    from reneg.tiny import build_tiny_pipeline

    pipe = _sd_pipe(build_tiny_pipeline(str(tmp_path / "sd1"), hidden=768))
    emb = load_embedding(path).tensor.float()
    prompts = ["a red circle", "a blue square"]
    kw = reneg.load_negative(pipe, path, prompts)
    noise = _noise(2, 4, 8, 8, seed=10)
    got = _latents(pipe, noise, **kw)
    assert torch.equal(got, _latents(pipe, noise, prompt=prompts, negative_prompt_embeds=emb.expand(2, -1, -1)))
    with pytest.raises(EmbeddingError, match=r"sd2\.1_reneg_emb\.bin: this is a sd2 embedding .* sd1 pipeline"):
        reneg.load_negative(pipe, path.parent / "sd2.1_reneg_emb.bin")


def test_video_pipelines_take_the_kwargs(tmp_path, tiny_pipeline_dir, sd, sd_neg):
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, TextToVideoSDPipeline

    from reneg.tiny import build_tiny_text_to_video

    path = _file(tmp_path, "neg.safetensors", sd_neg, "tiny")
    torch.manual_seed(0)
    adapter = MotionAdapter(  # fits reneg.tiny's UNet: two blocks of 32 and 64 channels
        block_out_channels=(32, 64),
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=8,
        motion_max_seq_length=8,
        use_motion_mid_block=False,
    )
    anim = AnimateDiffPipeline.from_pipe(sd, motion_adapter=adapter)
    anim.scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    anim.set_progress_bar_config(disable=True)
    t2v = TextToVideoSDPipeline.from_pretrained(
        build_tiny_text_to_video(str(tmp_path / "t2v"), hidden=64), local_files_only=True
    )
    t2v.set_progress_bar_config(disable=True)
    noise = _noise(2, 4, 2, 8, 8, seed=8)
    prompts = ["a red circle", "a blue square"]
    for pipe in (anim, t2v):
        kw = reneg.load_negative(pipe, path, prompts)
        assert set(kw) == {"prompt", "negative_prompt_embeds"}
        common = dict(num_frames=2, height=16, width=16, steps=2)
        got = _latents(pipe, noise, **common, **kw)
        hand = _latents(pipe, noise, **common, prompt=prompts, negative_prompt_embeds=sd_neg.expand(2, -1, -1))
        assert torch.equal(got, hand)
        null = _latents(pipe, noise, **common, prompt=prompts, negative_prompt=["", ""])
        assert _rel(got, null) > 1e-4, type(pipe).__name__


def test_refusals_name_the_file_what_was_expected_and_what_was_found(tmp_path, sd, sd_neg, tiny_pipeline_dir):
    xl = _file(tmp_path, "xl.safetensors", torch.zeros(1, 77, 2048), "sdxl", pooled=torch.zeros(1, 1280))
    with pytest.raises(
        EmbeddingError,
        match=r"xl\.safetensors: this is a sdxl embedding \(Stable Diffusion XL, hidden size 2048\), but "
        r"StableDiffusionPipeline is a tiny pipeline \(.*hidden size 64\)",
    ):
        reneg.load_negative(sd, xl)
    odd = tmp_path / "odd.bin"
    torch.save(torch.zeros(1, 77, 100), odd)
    with pytest.raises(EmbeddingError, match=r"odd\.bin: unknown hidden size 100 .* expected one of 768"):
        reneg.load_negative(sd, odd)
    good = _file(tmp_path, "cut.safetensors", sd_neg, "tiny")
    data = open(good, "rb").read()
    open(good, "wb").write(data[: len(data) // 2])
    with pytest.raises(EmbeddingError, match=r"cut\.safetensors: .*(corrupt|byte range|not a readable)"):
        reneg.load_negative(sd, good)
    path = _file(tmp_path, "neg.safetensors", sd_neg, "tiny")
    for bad in (1.5, -0.1, float("nan"), "strong"):
        with pytest.raises(ValueError, match="strength must be"):
            reneg.load_negative(sd, path, strength=bad)
    with pytest.raises(ValueError, match="object: not a pipeline ReNeg knows .*PixArtAlphaPipeline"):
        reneg.load_negative(object(), path)
    with pytest.raises(ValueError, match=r"matched to the prompt's 100"):
        reneg.load_negative(sd, path, prompt_embeds=torch.zeros(1, 100, 64))

    # values finite in float32 but inf in the float16 a pipeline computes in
    huge = _file(tmp_path, "huge.safetensors", sd_neg * 0 + 1e5, "tiny")
    half = _sd_pipe(tiny_pipeline_dir, dtype=torch.float16)
    assert reneg.load_negative(half, path)["negative_prompt_embeds"].dtype == torch.float16
    with pytest.raises(
        EmbeddingError,
        match=r"huge\.safetensors: its values reach 1e\+05, beyond float16's .* StableDiffusionPipeline computes in",
    ):
        reneg.load_negative(half, huge)

    # a pipeline loaded without its text encoder (prompt_embeds only): the UNet tells the family;
    # strength 1 needs no encoder, a blend with the empty prompt does
    bare = type(sd)(**{**sd.components, "text_encoder": None})
    assert torch.equal(reneg.load_negative(bare, path)["negative_prompt_embeds"], sd_neg)
    with pytest.raises(ValueError, match="strength 0.5 .* loaded without one"):
        reneg.load_negative(bare, path, strength=0.5)


def test_other_kinds_of_file_plug_in_as_readers(tmp_path, sd, sd_neg, monkeypatch):
    """READERS is where other kinds of ReNeg file go (negative tokens, per-prompt predictors): a reader
    that recognises its file returns a Negative, one per prompt if it likes, and everything after reading
    (blend, batch, dtype, argument names) is load_negative's."""
    from reneg import diffusers_api
    from reneg.diffusers_api import Negative

    seen = []

    def per_prompt(path, pipe, family, prompts):
        if not str(path).endswith(".pred"):
            return None
        seen.append((family.name, prompts))
        return Negative(torch.stack([sd_neg[0] * (i + 1) for i in range(len(prompts))]))

    monkeypatch.setattr(diffusers_api, "READERS", [per_prompt])
    pred = tmp_path / "neg.pred"
    pred.write_bytes(b"")
    kw = reneg.load_negative(sd, pred, ["a", "b", "c"])
    assert seen == [("tiny", ["a", "b", "c"])]
    assert torch.equal(kw["negative_prompt_embeds"][2], 3 * sd_neg[0])
    with torch.no_grad():
        _, e = sd.encode_prompt("", "cpu", 1, True, negative_prompt="")
    half = reneg.load_negative(sd, pred, ["a", "b"], strength=0.5)["negative_prompt_embeds"]
    assert torch.allclose(half[1], torch.lerp(e[0], 2 * sd_neg[0], 0.5), atol=1e-6)
    with pytest.raises(ValueError, match=r"neg\.pred: gives 3 negatives for 2 prompts"):
        monkeypatch.setattr(diffusers_api, "READERS", [lambda *a: Negative(sd_neg.expand(3, -1, -1))])
        reneg.load_negative(sd, pred, ["a", "b"])
    # a file no reader claims is read as an embedding
    path = _file(tmp_path, "neg.safetensors", sd_neg, "tiny")
    monkeypatch.setattr(diffusers_api, "READERS", [per_prompt])
    assert torch.equal(reneg.load_negative(sd, path)["negative_prompt_embeds"], sd_neg)


def test_token_and_predictor_files_are_read_too(tmp_path, sd, sd_neg, tiny_pipeline_dir, tiny_backend, tiny_sdxl_dir):
    """A negative-token file gives what diffusers' own load_textual_inversion gives for its name as the negative
    prompt (SD and SDXL, pooled vector included); a predictor file gives each prompt the negative ReNeg's
    sampler gives it (predicted_cond on the prompt's encoding); another family's file is refused."""
    from diffusers import StableDiffusionXLPipeline

    from reneg.embedding import EmbeddingError
    from reneg.predictor import from_embedding, predicted_cond, save_predictor
    from reneg.tokens import TokenNegative, save_tokens

    # tokens, SD-type (this pipeline's CLIP is 64 wide: family tiny)
    v = _noise(4, 64, seed=3) * 0.02
    tok = save_tokens(tmp_path / "neg4.pt", TokenNegative.from_flat(v, "tiny"))
    ref = _sd_pipe(tiny_pipeline_dir)
    ref.load_textual_inversion(tok, token="<neg4>")
    with torch.no_grad():
        _, want = ref.encode_prompt("a red circle", "cpu", 1, True, negative_prompt="<neg4>")
    got = reneg.load_negative(sd, tok, "a red circle")["negative_prompt_embeds"]
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, sd.encode_prompt("", "cpu", 1, False)[0])

    # tokens, SDXL: clip_l + clip_g, and the pooled vector from the second encoder
    xl = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    vx = _noise(3, 2048, seed=4) * 0.02
    tokx = save_tokens(tmp_path / "xl3.safetensors", TokenNegative.from_flat(vx, "sdxl"))
    kw = reneg.load_negative(xl, tokx, "a red circle")
    refx = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    from safetensors.torch import load_file

    parts = load_file(tokx)
    refx.load_textual_inversion(parts["clip_l"], token="<x>", text_encoder=refx.text_encoder, tokenizer=refx.tokenizer)
    refx.load_textual_inversion(
        parts["clip_g"], token="<x>", text_encoder=refx.text_encoder_2, tokenizer=refx.tokenizer_2
    )
    with torch.no_grad():
        _, neg, _, neg_pooled = refx.encode_prompt("a red circle", device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=True, negative_prompt="<x>")  # fmt: skip
    assert torch.allclose(kw["negative_prompt_embeds"], neg, atol=1e-6)
    assert torch.allclose(kw["negative_pooled_prompt_embeds"], neg_pooled, atol=1e-6)
    with pytest.raises(EmbeddingError, match="sdxl"):  # SDXL tokens on an SD pipeline
        reneg.load_negative(sd, tokx, "a red circle")

    # a predictor: one negative per prompt, as ReNeg's sampler makes it
    model = from_embedding(NegEmbedding(sd_neg, "tiny"), "xattn", rank=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in ("up", "mix", "up_pooled"):
                p.copy_(_noise(*p.shape, seed=5) * 0.1)
    pred = save_predictor(tmp_path / "pred.safetensors", model)
    prompts = ["a red circle", "a blue square on a green house"]
    got = reneg.load_negative(sd, pred, prompts)["negative_prompt_embeds"]
    with torch.no_grad():
        want = predicted_cond(model, tiny_backend.encode_prompts(prompts)).crossattn
    assert got.shape == (2, 77, 64) and torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got[0], got[1], atol=1e-4)  # each prompt its own
    with pytest.raises(ValueError, match="give load_negative the prompts"):
        reneg.load_negative(sd, pred, prompt_embeds=torch.zeros(2, 77, 64))
    with pytest.raises(EmbeddingError, match="tiny"):  # this SD-type predictor on the SDXL pipeline
        reneg.load_negative(xl, pred, prompts)


def test_the_api_is_import_light():
    code = (
        "import sys, reneg, reneg.diffusers_api\n"
        "assert callable(reneg.load_negative)\n"
        "heavy = [m for m in ('diffusers', 'transformers', 'open_clip', 'reneg.trainer', 'reneg.rewards',"
        " 'reneg.generate') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_families_register_by_the_table():
    from reneg.diffusers_api import PIPELINE_TEXT, pipeline_text
    from reneg.families import FAMILIES

    assert set(PIPELINE_TEXT) <= set(FAMILIES)
    with pytest.raises(ValueError, match="'sd9' is not a family"):
        pipeline_text("sd9")(lambda pipe, texts, device, rows: None)
