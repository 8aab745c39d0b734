"""SDXL through the diffusers backend: a small SDXL-architecture folder with SDXL's real
conditioning sizes (2048-wide cross-attention from two encoders, a 1280 pooled vector,
six size numbers), loaded the way a user's stable-diffusion-xl-base-1.0 folder is."""

from __future__ import annotations

import json
import os

import pytest
import torch

from reneg.backends.diffusers_backend import ModelLoadError
from reneg.backends.loading import load_diffusers
from reneg.cli import main
from reneg.cond import Cond
from reneg.embedding import EmbeddingError, load_embedding
from reneg.sampling import initial_latent, sample, to_vp


@pytest.fixture(scope="module")
def xl(tiny_sdxl_dir):
    return load_diffusers(tiny_sdxl_dir)


def _pipe(folder):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_encoding_and_sampler_match_diffusers_xl_pipeline(tiny_sdxl_dir, xl):
    assert xl.family == "sdxl" and xl.pooled_dim == 1280
    pipe = _pipe(tiny_sdxl_dir)
    prompts = ["a red circle", "a blue square"]
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=["", ""]
    )
    cond = xl.encode_prompts(prompts)
    assert cond.crossattn.shape == (2, 77, 2048) and cond.pooled.shape == (2, 1280)
    assert torch.allclose(cond.crossattn, pe, atol=1e-6) and torch.allclose(cond.pooled, ppe, atol=1e-6)
    null, null_pooled = xl.null_embedding()
    assert torch.allclose(null, npe[:1], atol=1e-6) and torch.allclose(null_pooled, nppe[:1], atol=1e-5)
    # the empty negative's pooled vector is the one a negative carries unless given another
    assert torch.equal(xl.negative_cond(null).pooled, null_pooled)

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sig = xl.schedule(12)
    # the tiny VAE halves the size: 8 x 8 latents are 16 x 16 pixels, which is what the size conditioning says
    ref = pipe(
        prompt=prompts,
        negative_prompt=["", ""],
        latents=noise.clone(),
        num_inference_steps=12,
        guidance_scale=7.5,
        eta=0.0,
        output_type="latent",
        height=16,
        width=16,
    ).images
    x, _ = sample(xl.denoiser, initial_latent(noise, sig[0]), sig, cond, xl.negative_cond(null), 7.5)
    rel = ((to_vp(x, sig[-1]) - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel

    # size conditioning given explicitly (original size 40 x 24) travels in Cond.extra["time_ids"]
    ref2 = pipe(
        prompt=prompts,
        negative_prompt=["", ""],
        latents=noise.clone(),
        num_inference_steps=12,
        guidance_scale=7.5,
        eta=0.0,
        output_type="latent",
        height=16,
        width=16,
        original_size=(40, 24),
    ).images
    tid = torch.tensor([[40.0, 24.0, 0.0, 0.0, 16.0, 16.0]])
    c2 = Cond(cond.crossattn, cond.pooled, {"time_ids": tid.expand(2, 6)})
    u2 = Cond(null, null_pooled, {"time_ids": tid})
    x2, _ = sample(xl.denoiser, initial_latent(noise, sig[0]), sig, c2, u2, 7.5)
    rel2 = ((to_vp(x2, sig[-1]) - ref2).norm() / ref2.norm()).item()
    assert rel2 < 1e-4, rel2
    assert ((ref2 - ref).norm() / ref.norm()).item() > 1e-3  # the size numbers do reach the UNet


def test_native_resolution_note(xl, tiny_backend):
    assert xl.native_resolution == 16 and xl.resolution_note(16) is None
    assert "makes 16 px images natively" in xl.resolution_note(32)
    assert tiny_backend.native_resolution == 16 and tiny_backend.resolution_note(16) is None


def test_sdxl_denoiser_refuses_a_cond_without_pooled_vector(xl):
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="pooled text vector"):
        xl.denoiser(x, torch.tensor([1.0]), Cond(torch.zeros(1, 77, 2048)))


def _prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")))
    return str(p)


def test_sdxl_train_tune_and_eval_through_the_cli(tmp_path, tiny_sdxl_dir, xl, tiny_hps_ckpt, capsys):
    prompts = _prompts(tmp_path)
    out = tmp_path / "run"
    common = [
        "--model",
        tiny_sdxl_dir,
        "--reward",
        f"hpsv2={tiny_hps_ckpt}",
        "--sampling-steps",
        "4",
        "--grad-range",
        "0",
        "1",
        "--resolution",
        "16",
    ]
    rc = main(
        [
            "train",
            *common,
            "--prompts",
            prompts,
            "--heldout-count",
            "2",
            "--out",
            str(out),
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--micro-batch",
            "2",
            "--lr",
            "0.05",
            "--eval-every",
            "3",
            "--no-progress",
            "--handcrafted",
            "blurry",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["family"] == "sdxl" and set(summary["heldout"]) == {"null", "handcrafted", "learned", "diversity"}
    emb = load_embedding(out / "embedding.safetensors", expected_family="sdxl")
    null, null_pooled = xl.null_embedding()
    assert emb.tensor.shape == (1, 77, 2048) and not torch.allclose(emb.tensor, null)
    # the file carries the pooled vector training used: the empty prompt's
    assert emb.pooled is not None and torch.allclose(emb.pooled, null_pooled)
    with pytest.raises(EmbeddingError, match="model in use is sd1"):
        load_embedding(out / "embedding.safetensors", expected_family="sd1")

    tuned = tmp_path / "tuned.safetensors"
    capsys.readouterr()
    rc = main(
        [
            "tune",
            *common,
            "--prompt",
            "a red circle",
            "--seed",
            "1",
            "--max-steps",
            "2",
            "--patience",
            "2",
            "--lr",
            "0.05",
            "--embedding",
            str(out / "embedding.safetensors"),
            "--out",
            str(tuned),
            "--resolution",
            "32",
        ]
    )
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    # away from the model's own size (here 16 px; SDXL's is 1024) the user is told once
    assert "reneg tune: note: sdxl makes 16 px images natively; --resolution 32 works at 32 px" in printed.out
    t = load_embedding(tuned, expected_family="sdxl")
    assert t.metadata["kind"] == "per-sample" and torch.allclose(t.pooled, null_pooled)

    ev = tmp_path / "eval"
    rc = main(
        [
            "eval",
            *common,
            "--prompts",
            prompts,
            "--limit",
            "2",
            "--negative",
            "null",
            "--negative",
            "handcrafted:blurry",
            "--negative",
            f"learned={out / 'embedding.safetensors'}",
            "--negative",
            "zero",
            "--batch",
            "2",
            "--out",
            str(ev),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    s = json.loads((ev / "summary.json").read_text())
    assert [n["name"] for n in s["negatives"]] == ["null", "handcrafted", "learned", "zero"]
    assert s["images"] == {"null": 2, "handcrafted": 2, "learned": 2, "zero": 2}
    # a text negative is what a UI makes of that negative prompt: its own pooled vector, not the empty prompt's
    from reneg.evaluation.images import load_frames
    from reneg.generate import generate, seeded_noise

    name = next(n for n in os.listdir(ev / "images") if n.endswith("_handcrafted.png"))
    index, seed = int(name.split("_")[0]), int(name.split("_")[1][1:])
    text = open(prompts).read().splitlines()[index]
    saved = load_frames(str(ev / "images" / name))
    hc = xl.encode_prompts(["blurry"])
    noise = seeded_noise(xl, [seed], 16, 16)
    cond = xl.encode_prompts([text])

    def image(pooled):
        return generate(xl, cond, xl.negative_cond(hc.crossattn, pooled), noise, 4, 7.5).cpu()

    own, empty = image(hc.pooled), image(None)
    assert (own - saved).abs().max() <= 2 / 255 + 1e-6
    assert (empty - saved).abs().max() > (own - saved).abs().max()
    # `zero` is the all-zero negative A1111 and Forge make from an empty SDXL negative prompt
    zname = name.replace("_handcrafted.png", "_zero.png")
    zero = generate(xl, cond, Cond(torch.zeros(1, 77, 2048), torch.zeros(1, 1280)), noise, 4, 7.5).cpu()
    assert (zero - load_frames(str(ev / "images" / zname))).abs().max() <= 2 / 255 + 1e-6


def _linked(tmp_path, name, base, swap: dict):
    """A model folder of symlinks to ``base``'s parts, with some parts swapped or left out."""
    d = tmp_path / name
    d.mkdir()
    for part in os.listdir(base):
        src = swap.get(part, os.path.join(base, part))
        if src is not None:
            os.symlink(src, d / part)
    return str(d)


def test_sdxl_folder_problems_are_named(tmp_path, tiny_sdxl_dir, tiny_pipeline_dir):
    no_tok2 = _linked(tmp_path, "no_tok2", tiny_sdxl_dir, {"tokenizer_2": None})
    with pytest.raises(
        ModelLoadError, match=r"not a complete diffusers Stable Diffusion XL folder; missing tokenizer_2"
    ):
        load_diffusers(no_tok2)
    sd1_unet = _linked(tmp_path, "sd1_unet", tiny_sdxl_dir, {"unet": os.path.join(tiny_pipeline_dir, "unet")})
    with pytest.raises(ModelLoadError, match="does not read SDXL's pooled vector"):
        load_diffusers(sd1_unet)
    xl_unet = _linked(tmp_path, "xl_unet", tiny_pipeline_dir, {"unet": os.path.join(tiny_sdxl_dir, "unet")})
    with pytest.raises(ModelLoadError, match="no text_encoder_2/"):
        load_diffusers(xl_unet)


def test_sdxl_eval_in_bf16_on_the_cpu(tmp_path, tiny_sdxl_dir, tiny_hps_ckpt, capsys):
    """``reneg eval --mixed-precision bf16``: an SDXL checkpoint evaluated on a CPU in half the memory; the
    images are the fp32 images up to bf16 rounding, and a tuned negative runs under autocast."""
    from reneg.evaluation.images import load_frames

    prompts = _prompts(tmp_path)
    common = ["--model", tiny_sdxl_dir, "--reward", f"hpsv2={tiny_hps_ckpt}", "--sampling-steps", "4"]
    common += ["--grad-range", "0", "1", "--resolution", "16", "--prompts", prompts, "--limit", "2"]
    common += ["--batch", "2", "--no-progress", "--tune-steps", "2", "--tune-patience", "2"]
    runs = {}
    for mp in ("no", "bf16"):
        ev = tmp_path / f"eval-{mp}"
        rc = main(
            ["eval", *common, "--negative", "null", "--negative", "tuned:null", "--out", str(ev)]
            + ["--mixed-precision", mp]
        )
        assert rc == 0, capsys.readouterr().err
        s = json.loads((ev / "summary.json").read_text())
        assert s["images"] == {"null": 2, "tuned-null": 2} and s["settings"]["mixed_precision"] == mp
        runs[mp] = {n: load_frames(str(ev / "images" / n)) for n in sorted(os.listdir(ev / "images"))}
    assert runs["no"].keys() == runs["bf16"].keys()
    diffs = [(runs["no"][n] - runs["bf16"][n]).abs().max().item() for n in runs["no"] if n.endswith("_null.png")]
    assert 0 < max(diffs) < 0.25, diffs  # bf16 really ran, and made the same images up to its rounding
    # images made in fp32 are not mixed with bf16 ones: the folder's manifest knows the precision
    rc = main(["eval", *common, "--negative", "null", "--out", str(tmp_path / "eval-no"), "--mixed-precision", "bf16"])
    assert rc != 0 and "mixed_precision" in capsys.readouterr().err
