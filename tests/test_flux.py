"""Flux.1 dev and schnell through the diffusers backend, on small Flux-architecture folders with Flux's
real conditioning sizes (T5 rows 4096 wide, 512 or 256 of them, CLIP-L's 768 pooled vector, 16 latent
channels in 2x2 patches, dev's guidance embedding), loaded the way a user's Flux folder is."""

from __future__ import annotations

import pytest
import torch

from reneg.backends.flux import pack, unpack
from reneg.backends.loading import load_diffusers
from reneg.sampling import initial_latent, is_flow, sample
from reneg.tiny import build_tiny_flux


@pytest.fixture(scope="module")
def dev(tiny_flux_dir):
    return load_diffusers(tiny_flux_dir)


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory):
    return build_tiny_flux(str(tmp_path_factory.mktemp("flux") / "schnell"), seed=1, schnell=True)


def _pipe(folder):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _reference(pipe, cond, noise, steps, rows, guidance=3.5, **kw):
    """FluxPipeline's latents for the same prompt embeddings and noise, unpacked."""
    h, w = noise.shape[-2:]
    out = pipe(
        prompt_embeds=cond.crossattn,
        pooled_prompt_embeds=cond.pooled,
        latents=pack(noise),
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=h * pipe.vae_scale_factor,
        width=w * pipe.vae_scale_factor,
        output_type="latent",
        max_sequence_length=rows,
        **kw,
    ).images
    return unpack(out, h, w)


def _check_family(backend, folder, family, rows, guidance_embeds):
    assert type(backend).__name__ == "FluxBackend" and backend.family == family and backend.flow
    assert backend.denoiser.guidance_embeds is guidance_embeds and backend.max_tokens == rows
    pipe = _pipe(folder)
    prompts = ["a red circle", "a blue square on a green house"]
    pe, pp, text_ids = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=rows)
    cond = backend.encode_prompts(prompts)
    assert cond.crossattn.shape == (2, rows, 4096) and cond.pooled.shape == (2, 768) and cond.mask is None
    torch.testing.assert_close(cond.crossattn, pe, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cond.pooled, pp, atol=1e-5, rtol=1e-5)
    assert text_ids.abs().sum() == 0  # txt_ids are zeros, as the denoiser makes them

    steps = 6
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    assert backend.latent_shape(2, 32, 32) == (2, 16, 16, 16)
    sig = backend.schedule(steps)
    pipe.scheduler.set_timesteps(sigmas=[1 - i / steps for i in range(steps)], mu=_mu(pipe, 64))
    torch.testing.assert_close(sig.float(), pipe.scheduler.sigmas, atol=1e-6, rtol=0)
    null, null_pooled = backend.null_embedding()
    assert null.shape == (1, rows, 4096) and null_pooled.shape == (1, 768)

    # CFG 1, the way Flux is run: the negative is never read
    ref = _reference(pipe, cond, noise, steps, rows)
    ours, _ = sample(
        backend.denoiser, initial_latent(noise, sig[0], is_flow(backend)), sig, cond, backend.negative_cond(null), 1.0
    )
    assert _rel(ours, ref) < 1e-5

    # true CFG with a negative's rows and its own pooled vector (FluxPipeline's true_cfg_scale)
    rows_n, pooled_n = backend._encode(["blurry, ugly, low quality"])
    ref_n = _reference(
        pipe,
        cond,
        noise,
        steps,
        rows,
        true_cfg_scale=3.0,
        negative_prompt_embeds=rows_n.expand(2, -1, -1),
        negative_pooled_prompt_embeds=pooled_n.expand(2, -1),
    )
    for batched in (True, False):
        ours_n, _ = sample(
            backend.denoiser, noise.clone(), sig, cond, backend.negative_cond(rows_n, pooled_n), 3.0, batched=batched
        )
        assert _rel(ours_n, ref_n) < 1e-5
    assert _rel(ref_n, ref) > 1e-3  # the negative reaches the transformer
    # both halves of a negative matter: its rows and its pooled vector
    only_rows, _ = sample(
        backend.denoiser, initial_latent(noise, sig[0], is_flow(backend)), sig, cond, backend.negative_cond(rows_n), 3.0
    )
    assert _rel(only_rows, ref_n) > 1e-4
    # the text negative train and eval make is the pipeline's negative_prompt_embeds (all rows, no mask)
    from reneg.generate import text_negative

    t, tp = text_negative(backend, "blurry, ugly, low quality")
    assert t.shape == (1, rows, 4096) and torch.equal(t, rows_n) and torch.equal(tp, pooled_n)
    return pipe, cond, noise, ref


def _mu(pipe, seq_len):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = pipe.scheduler.config
    return calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)


def test_dev_encoding_schedule_and_sampler_match_flux_pipeline(tiny_flux_dir, dev):
    pipe, cond, noise, ref = _check_family(dev, tiny_flux_dir, "flux-dev", 512, True)
    # the distilled guidance scale reaches the guidance embedding, as the pipeline's guidance_scale does
    null = dev.negative_cond(dev.null_embedding()[0])
    dev.guidance = 5.0
    try:
        ours, _ = sample(dev.denoiser, noise.clone(), dev.schedule(6), cond, null, 1.0)
    finally:
        dev.guidance = 3.5
    ref5 = _reference(pipe, cond, noise, 6, 512, guidance=5.0)
    assert _rel(ours, ref5) < 1e-5 and _rel(ref5, ref) > 1e-4
    # a conditioning may carry its own guidance (ComfyUI's Flux conditioning does)
    from reneg.cond import Cond

    c5 = Cond(cond.crossattn, cond.pooled, {"guidance": torch.tensor([5.0, 5.0])})
    n5 = Cond(null.crossattn, null.pooled, {"guidance": torch.tensor([5.0])})
    ours5, _ = sample(dev.denoiser, noise.clone(), dev.schedule(6), c5, n5, 1.0)
    assert _rel(ours5, ref5) < 1e-5

    # the images train and eval make (reneg.generate: flow start, sampler, VAE decode) are the pipeline's
    from reneg.generate import generate

    img = generate(dev, cond, null, noise, 6, 1.0)
    ref_img = pipe(
        prompt_embeds=cond.crossattn,
        pooled_prompt_embeds=cond.pooled,
        latents=pack(noise),
        num_inference_steps=6,
        height=32,
        width=32,
        output_type="pt",
    ).images
    assert img.shape == (2, 3, 32, 32) and _rel((img + 1) / 2, ref_img) < 1e-5


@pytest.mark.slow
def test_schnell_matches_flux_pipeline(schnell_dir):
    backend = load_diffusers(schnell_dir)
    _check_family(backend, schnell_dir, "flux-schnell", 256, False)
    # a flux-dev file (512 rows) loads for schnell (the same encoders); the backend refuses its row count
    with pytest.raises(ValueError, match="flux-schnell model's negatives have 256 T5 rows .* has 512"):
        backend.negative_cond(torch.zeros(1, 512, 4096))


def test_dev_schedule_shifts_with_the_image_size(dev):
    from reneg.backends.flux import calculate_shift

    cfg = dev.scheduler_config
    assert calculate_shift(256, cfg) == pytest.approx(0.5) and calculate_shift(4096, cfg) == pytest.approx(1.15)
    at_1024 = dev.schedule(4, 256, 256)  # 64 x 64 patches of the tiny VAE's 2x latents: mu = 1.15
    assert at_1024[1].item() == pytest.approx(torch.e**1.15 / (torch.e**1.15 + 1 / 3), rel=1e-6)
    dev.latent_shape(1, 64, 32)
    assert torch.equal(dev.schedule(4), dev.schedule(4, 64, 32))  # the last latent's size by default
    assert not torch.equal(dev.schedule(4, 64, 32), at_1024)
    assert dev.schedule(4)[0] == 1 and dev.schedule(4)[-1] == 0
    with pytest.raises(ValueError, match="multiples of 4"):
        dev.latent_shape(1, 30, 32)


def test_decode_uses_the_vae_scaling_and_shift(dev):
    x0 = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    vae = dev.vae
    with torch.no_grad():
        want = vae.decode(x0 / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        got = dev.decode(x0)
    assert vae.config.shift_factor == pytest.approx(0.1159)
    torch.testing.assert_close(got, want.clamp(-1, 1))


def test_negatives_are_the_models_rows_with_a_pooled_vector(dev):
    null, pooled = dev.null_embedding()
    c = dev.negative_cond(null)
    assert torch.equal(c.pooled, pooled) and c.mask is None
    with pytest.raises(ValueError, match="512 T5 rows"):
        dev.negative_cond(null[:, :256])
    with pytest.raises(ValueError, match="attention mask with padding"):
        dev.negative_cond(null, mask=torch.tensor([[1] + [0] * 511]))
    with pytest.raises(Exception, match="flow velocity"):
        dev.set_prediction_type("v_prediction")


def test_attention_modules_are_the_joint_attentions(dev):
    mods = dev.attention_modules()
    assert [n for n, _ in mods] == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert all(type(m.processor).__name__ == "FluxAttnProcessor" for _, m in mods)
    # a processor set on them is the one the transformer calls
    calls = []
    for _, m in mods:
        inner = m.processor

        def spy(*a, _inner=inner, **k):
            calls.append(1)
            return _inner(*a, **k)

        m.processor = spy
    try:
        with torch.no_grad():
            x = torch.randn(1, 16, 8, 8)
            dev.denoiser(x, torch.tensor([0.5]), dev.negative_cond(dev.null_embedding()[0]))
    finally:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        dev.transformer.set_attn_processor(FluxAttnProcessor())
    assert len(calls) == 2


def test_flux_embeddings_are_their_own_family(tmp_path, dev):
    from reneg.embedding import EmbeddingError, NegEmbedding, load_embedding, save_embedding
    from reneg.generate import as_embedding

    null, pooled = dev.null_embedding()
    emb = as_embedding(dev, null)
    assert emb.family == "flux-dev" and emb.pooled.shape == (1, 768) and emb.attention_mask is None
    p = save_embedding(str(tmp_path / "f.safetensors"), emb)
    back = load_embedding(p, expected_family="flux-dev")
    assert torch.equal(back.tensor, null) and torch.equal(back.pooled, pooled)
    # a bare [1, 512, 4096] tensor is flux-dev, [1, 256, 4096] flux-schnell
    torch.save(torch.zeros(1, 256, 4096), tmp_path / "s.pt")
    assert load_embedding(tmp_path / "s.pt").family == "flux-schnell"
    for other in ("sd1", "sdxl", "pixart"):
        with pytest.raises(EmbeddingError, match=f"flux-dev embedding.*model in use is {other}"):
            load_embedding(p, expected_family=other)
    # dev and schnell share their text encoders (one ComfyUI CLIP serves both), so the file loads for
    # schnell; schnell's backend reads 256 rows and says so about dev's 512 (test_schnell_matches_flux_pipeline)
    assert load_embedding(p, expected_family="flux-schnell").family == "flux-dev"
    with pytest.raises(EmbeddingError, match="model in use is flux-dev"):
        save_embedding(str(tmp_path / "sd.safetensors"), NegEmbedding(torch.zeros(1, 77, 768), "sd1"))
        load_embedding(tmp_path / "sd.safetensors", expected_family="flux-dev")


@pytest.mark.slow
def test_flux_train_tune_and_eval_through_the_cli(tmp_path, tiny_flux_dir, dev, tiny_hps_ckpt, capsys):
    """The user's commands on a Flux folder, with true CFG (--guidance 3) as the negative's guidance."""
    import json

    from reneg.cli import main
    from reneg.embedding import load_embedding

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")))
    common = ["--model", tiny_flux_dir, "--reward", f"hpsv2={tiny_hps_ckpt}", "--sampling-steps", "4"]
    common += ["--grad-range", "0", "1", "--resolution", "32", "--guidance", "3"]
    out = tmp_path / "run"
    train = ["train", *common, "--prompts", str(prompts), "--heldout-count", "2", "--out", str(out), "--steps", "3"]
    train += ["--batch-size", "2", "--micro-batch", "2", "--lr", "0.05", "--eval-every", "3", "--no-progress"]
    assert main([*train, "--handcrafted", "blurry"]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["family"] == "flux-dev" and set(summary["heldout"]) >= {"null", "handcrafted", "learned"}
    emb = load_embedding(out / "embedding.safetensors", expected_family="flux-dev")
    null, pooled = dev.null_embedding()
    assert emb.tensor.shape == (1, 512, 4096) and not torch.allclose(emb.tensor, null)
    assert torch.equal(emb.pooled, pooled)  # the rows are learned; the pooled vector is the empty prompt's

    tuned = tmp_path / "tuned.safetensors"
    tune = ["tune", *common, "--prompt", "a red circle", "--seed", "1", "--max-steps", "2", "--patience", "2"]
    tune += ["--lr", "0.05", "--embedding", str(out / "embedding.safetensors"), "--out", str(tuned)]
    assert main(tune) == 0, capsys.readouterr().err
    assert load_embedding(tuned, expected_family="flux-dev").metadata["kind"] == "per-sample"

    ev = tmp_path / "eval"
    negs = ["--negative", "null", "--negative", "handcrafted:blurry, ugly"]
    negs += ["--negative", f"learned={out / 'embedding.safetensors'}"]
    rc = main(["eval", *common, "--prompts", str(prompts), "--limit", "2", *negs, "--batch", "2", "--out", str(ev)])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((ev / "summary.json").read_text())
    assert [n["name"] for n in s["negatives"]] == ["null", "handcrafted", "learned"]
    assert s["images"] == {"null": 2, "handcrafted": 2, "learned": 2}


# --------------------------------------------------------------------------- ComfyUI's single files


def _save(path, sd):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def test_comfyui_single_files_are_named_and_refused_clearly(tmp_path, tiny_flux_dir, capsys):
    import os

    from reneg.backends.diffusers_backend import ModelLoadError
    from reneg.backends.single_file import inspect_checkpoint
    from reneg.cli import main
    from reneg.tiny import bfl_flux_state_dict

    dev_sd = bfl_flux_state_dict(depth=2, depth_single=3, guidance=True)
    files = {
        "transformer-dev": _save(tmp_path / "flux1-dev.safetensors", dev_sd),
        "transformer-schnell": _save(
            tmp_path / "flux1-schnell.safetensors", bfl_flux_state_dict(guidance=False, dtype=torch.bfloat16)
        ),
        # the text encoders ComfyUI keeps in models/text_encoders are the transformers layouts the folder has
        "t5xxl": os.path.join(tiny_flux_dir, "text_encoder_2", "model.safetensors"),
        "clip_l": os.path.join(tiny_flux_dir, "text_encoder", "model.safetensors"),
        # the autoencoder in the LDM layout (its first and last convolutions: what the header test reads)
        "ae": _save(
            tmp_path / "ae.safetensors",
            {
                "encoder.down.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3),
                "encoder.conv_out.weight": torch.zeros(32, 8, 3, 3),
                "decoder.conv_in.weight": torch.zeros(8, 16, 3, 3),
            },
        ),
    }
    whole = {f"model.diffusion_model.{k}": v for k, v in dev_sd.items()}
    whole["text_encoders.t5xxl.transformer.shared.weight"] = torch.zeros(4, 4096)
    whole["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.zeros(768)
    whole["vae.decoder.conv_in.weight"] = torch.zeros(8, 16, 3, 3)
    files["checkpoint"] = _save(tmp_path / "flux1-dev-fp8.safetensors", whole)

    want = {
        "transformer-dev": ("transformer", "flux-dev", "2 double-stream, 3 single-stream, 64 wide"),
        "transformer-schnell": ("transformer", "flux-schnell", "no guidance embedding"),
        "t5xxl": ("t5xxl", "", "T5 v1.1 XXL, 1 layers, 4096 wide"),
        "clip_l": ("clip_l", "", "CLIP ViT-L/14 text model, 2 layers, 768 wide"),
        "ae": ("ae", "", "16 channels"),
        "checkpoint": ("checkpoint", "flux-dev", "2 double-stream"),
    }
    for name, path in files.items():
        part, family, detail = want[name]
        info = inspect_checkpoint(path)
        assert (info.part, info.family) == (part, family), name
        assert main(["inspect", path]) == 0
        out = capsys.readouterr().out
        assert detail in out and "FluxPipeline folder" in out and "ComfyUI keeps it in models/" in out, out
        assert main(["inspect", "--json", path]) == 0
        assert '"part": "%s"' % part in capsys.readouterr().out
        with pytest.raises(ModelLoadError) as e:
            load_diffusers(path)
        msg = str(e.value)
        assert msg.startswith(path + ": ") and "Stable Diffusion 3" not in msg, msg
        if part == "transformer":  # loaded with its parts (the test below); alone it asks for them
            assert "needs its text encoders: pass --text-encoder FILE for clip_l and t5xxl" in msg, msg
        elif part == "checkpoint":  # all four parts inside; T5's tokenizer is not, nor a ComfyUI folder around it
            assert "T5's tokenizer is not in these files; pass --tokenizer FOLDER" in msg, msg
            with pytest.raises(ModelLoadError, match="a Flux.1 part lacks the tensor"):  # one tensor an encoder here
                load_diffusers(path, tokenizer=os.path.join(tiny_flux_dir, "tokenizer_2"))
        else:  # a part alone: what it is, and what to give
            assert "diffusers FluxPipeline folder, or from these files together" in msg, msg


def test_comfyui_single_files_load_as_the_folder_does(tmp_path, tiny_flux_dir, tiny_hps_ckpt, capsys):
    """The four files a ComfyUI user holds (the transformer in the Black Forest Labs layout, clip_l, t5xxl, the
    ae in the LDM layout), placed as in a ComfyUI folder, load into the same model as the FluxPipeline folder made
    of the same weights: the same conditioning, schedule and images; T5's tokenizer is ComfyUI's own, found
    beside the files. ``reneg train`` takes them; a missing part is asked for by its flag."""
    import os
    import shutil

    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from ldm_layout import vae_to_ldm

    from reneg.backends.diffusers_backend import ModelLoadError
    from reneg.backends.single_file.flux import bfl_to_diffusers
    from reneg.cli import main
    from reneg.generate import generate
    from reneg.tiny import bfl_flux_state_dict

    # a folder and files with the same weights: the transformer file converted by diffusers' own function
    folder = tmp_path / "flux-folder"
    shutil.copytree(tiny_flux_dir, folder)
    bfl = bfl_flux_state_dict(hidden=64, depth=1, depth_single=1, head_dim=32, guidance=True, seed=3)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                attention_head_dim=32, num_attention_heads=2, joint_attention_dim=4096,
                                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(4, 14, 14))  # fmt: skip
    tr.load_state_dict(bfl_to_diffusers(bfl, 64), strict=True)  # diffusers' mapping (test below), at 64 wide
    shutil.rmtree(folder / "transformer")
    tr.save_pretrained(folder / "transformer")
    # CLIP-L's own heads (12 of 64), which a file does not record, at two layers and a narrow feed-forward
    from transformers import CLIPTextConfig, CLIPTextModel

    from reneg.backends.configs import architecture
    from reneg.tiny import save_text_encoder_prefixed

    clip_cfg = dict(architecture("sd1")["text_encoder"][1], num_hidden_layers=2, intermediate_size=64)
    shutil.rmtree(folder / "text_encoder")
    save_text_encoder_prefixed(CLIPTextModel(CLIPTextConfig(**clip_cfg)), str(folder / "text_encoder"))
    comfy = tmp_path / "ComfyUI"
    models = comfy / "models"
    for d in ("diffusion_models", "text_encoders", "vae"):
        (models / d).mkdir(parents=True)
    shutil.copytree(folder / "tokenizer_2", comfy / "comfy" / "text_encoders" / "t5_tokenizer")
    transformer = _save(models / "diffusion_models" / "flux1-dev.safetensors", bfl)
    clip = shutil.copy(folder / "text_encoder" / "model.safetensors", models / "text_encoders" / "clip_l.safetensors")
    t5 = shutil.copy(folder / "text_encoder_2" / "model.safetensors", models / "text_encoders" / "t5xxl.safetensors")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    ae = _save(models / "vae" / "ae.safetensors", vae_to_ldm(vae.state_dict(), dict(vae.config), prefix=""))

    a = load_diffusers(str(folder))
    b = load_diffusers(transformer, vae=ae, text_encoders=[str(t5), str(clip)])  # either order
    assert b.family == "flux-dev" and b.model_info["kind"] == "single files (ComfyUI)"
    assert b.model_info["tokenizer"].endswith(os.path.join("comfy", "text_encoders", "t5_tokenizer"))
    prompts = ["a red circle", "a blue square on a green house"]
    ca, cb = a.encode_prompts(prompts), b.encode_prompts(prompts)
    assert torch.equal(ca.crossattn, cb.crossattn) and torch.equal(ca.pooled, cb.pooled)
    assert torch.equal(a.schedule(4), b.schedule(4))
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    ua, ub = a.negative_cond(*a._encode(["blurry"])), b.negative_cond(*b._encode(["blurry"]))
    ia, ib = generate(a, ca, ua, noise, 4, 2.0), generate(b, cb, ub, noise, 4, 2.0)
    assert ia.abs().max() > 0 and torch.equal(ia, ib)

    # the CLI: the same files train a flux-dev negative (a tokenizer folder may also be given by hand)
    out = tmp_path / "run"
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts * 2))
    args = ["train", "--model", transformer, "--text-encoder", str(clip), "--text-encoder", str(t5), "--vae", ae]
    args += ["--tokenizer", str(folder / "tokenizer_2"), "--reward", "hpsv2=" + tiny_hps_ckpt]
    args += ["--prompts", str(prompts_file), "--sampling-steps", "3", "--grad-range", "0", "1", "--resolution", "32"]
    args += ["--heldout-count", "1", "--out", str(out), "--steps", "1", "--batch-size", "1", "--eval-every", "0"]
    assert main([*args, "--no-progress"]) == 0, capsys.readouterr().err
    from reneg.embedding import load_embedding

    assert load_embedding(out / "embedding.safetensors").family == "flux-dev"

    # a part missing: the message names the flag that gives it
    with pytest.raises(ModelLoadError, match=r"pass --text-encoder FILE for t5xxl"):
        load_diffusers(transformer, vae=ae, text_encoders=[str(clip)])
    with pytest.raises(ModelLoadError, match=r"needs its autoencoder: pass --vae FILE"):
        load_diffusers(transformer, text_encoders=[str(clip), str(t5)])
    with pytest.raises(ModelLoadError, match=r"--text-encoder .*ae.safetensors: the 16-channel autoencoder"):
        load_diffusers(transformer, vae=ae, text_encoders=[ae, str(t5)])
    # none of the files inside a ComfyUI folder: no tokenizer found
    outside = [_save(tmp_path / "flux1-dev.safetensors", bfl), str(folder / "text_encoder" / "model.safetensors")]
    with pytest.raises(ModelLoadError, match=r"T5's tokenizer is not in these files; pass --tokenizer FOLDER"):
        load_diffusers(
            outside[0], vae=ae, text_encoders=[outside[1], str(folder / "text_encoder_2" / "model.safetensors")]
        )
    with pytest.raises(ModelLoadError, match=r"--text-encoder: only for a model kept as separate files"):
        load_diffusers(str(clip), text_encoders=[str(t5)])


@pytest.mark.slow
def test_the_transformer_mapping_equals_diffusers_own_at_the_released_width():
    """``bfl_to_diffusers`` (any width) gives exactly what diffusers' converter (3072 wide only) gives, on a
    Black Forest Labs-layout file of the release's width with one block of each kind (bf16, ~1.1 GB)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from reneg.backends.single_file.flux import bfl_to_diffusers
    from reneg.tiny import bfl_flux_state_dict

    sd = bfl_flux_state_dict(hidden=3072, head_dim=128, depth=1, depth_single=1, dtype=torch.bfloat16)
    ours = bfl_to_diffusers(sd, 3072)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(sd))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
