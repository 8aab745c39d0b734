"""Chroma through the diffusers backend, on a small Chroma-architecture folder with Chroma's real
conditioning sizes (T5 width 4096, 512 tokens with an attention mask that covers one padding row,
16 latent channels packed to 64, flow matching with a dynamic shift), loaded the way a user's
ChromaPipeline folder is."""

from __future__ import annotations

import json

import pytest
import torch

from reneg.backends.loading import load_diffusers
from reneg.cli import main
from reneg.cond import Cond
from reneg.embedding import NegEmbedding, implied_attention_mask, load_embedding, save_embedding
from reneg.families import FAMILIES, family_for_model, family_for_shape
from reneg.sampling import initial_latent, sample
from reneg.tiny import build_tiny_chroma


@pytest.fixture(scope="module")
def chroma_dir(tmp_path_factory):
    return build_tiny_chroma(str(tmp_path_factory.mktemp("tiny") / "chroma"), seed=0)


@pytest.fixture(scope="module")
def chroma(chroma_dir):
    return load_diffusers(chroma_dir)


def _pipe(folder):
    from diffusers import ChromaPipeline

    pipe = ChromaPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_the_family_row_and_the_folder(chroma):
    f = FAMILIES["chroma"]
    assert (f.hidden, f.tokens, f.masked, f.reads_padding, f.text_space) == (4096, 512, True, 1, "t5xxl")
    assert family_for_shape(4096, 512, masked=True) is f and family_for_model(4096, "chroma") is f
    assert type(chroma).__name__ == "ChromaBackend" and chroma.family == "chroma" and chroma.flow
    assert chroma.latent_shape(2, 32, 32) == (2, 16, 16, 16)
    with pytest.raises(ValueError, match="multiples of 4"):
        chroma.latent_shape(1, 30, 32)


def test_encoding_matches_chroma_pipeline(chroma_dir, chroma):
    """The pipeline's rows on the mask it makes (the text, then one padding token); ours are zero
    past it, so the rows alone imply the mask."""
    pipe = _pipe(chroma_dir)
    prompts = ["a red circle", "a blue square on a green house", ""]
    emb, _, mask, *_ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu")
    ours = chroma.encode_prompts(prompts)
    assert ours.crossattn.shape == (3, 512, 4096) and torch.equal(ours.mask, mask.long())
    lengths = [len(chroma.tokenizer(p).input_ids) for p in prompts]  # the text's tokens with its </s>
    assert ours.mask.sum(1).tolist() == [n + 1 for n in lengths] and lengths[-1] == 1
    on = mask.bool()
    torch.testing.assert_close(ours.crossattn[on], emb[on], rtol=1e-5, atol=1e-6)
    assert not ours.crossattn[~on].any()
    null, pooled = chroma.null_embedding()
    assert pooled is None and chroma.null_mask().tolist() == [[1, 1] + [0] * 510]
    assert torch.equal(implied_attention_mask(null, 1), chroma.null_mask())
    assert torch.equal(chroma.negative_cond(null).mask, chroma.null_mask())


@pytest.mark.parametrize("steps", [3, 5])
def test_sampler_matches_chroma_pipeline_for_the_same_negative_and_masks(chroma_dir, chroma, steps):
    """Our sampler against ChromaPipeline given the same prompt and negative embeddings and boolean
    masks (batched cond/uncond of different lengths here, two calls there), the same packed noise,
    and the pipeline's own schedule for this image size."""
    pipe = _pipe(chroma_dir)
    prompts = ["a red circle", "a blue square on a green house"]
    cond = chroma.encode_prompts(prompts)
    g = torch.Generator().manual_seed(7)
    neg = torch.randn(1, 512, 4096, generator=g) * (torch.arange(512) < 4).view(1, -1, 1)  # 4 rows read
    uncond = chroma.negative_cond(neg)
    assert uncond.mask.sum() == 4
    noise = torch.randn(chroma.latent_shape(2, 32, 32), generator=g)
    sig = chroma.schedule(steps, tokens=chroma.image_tokens(32, 32))
    x, _ = sample(chroma.denoiser, initial_latent(noise, sig[0], flow=True), sig, cond, uncond, 5.0)

    from reneg.backends.chroma import pack_latents, unpack_latents

    ref = pipe(
        prompt_embeds=cond.crossattn,
        prompt_attention_mask=cond.mask.bool(),
        negative_prompt_embeds=neg.expand(2, -1, -1),
        negative_prompt_attention_mask=uncond.mask.bool().expand(2, -1),
        latents=pack_latents(noise),
        num_inference_steps=steps,
        guidance_scale=5.0,
        height=32,
        width=32,
        output_type="latent",
    ).images
    ref = unpack_latents(ref, 16, 16)
    assert _rel(x, ref) < 1e-5
    # and the decoded image is the pipeline's decode
    img = chroma.decode(x)
    vae = pipe.vae
    ref_img = vae.decode(ref / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(img, ref_img, rtol=1e-4, atol=1e-5)


def test_unread_rows_change_nothing_and_checkpointing_keeps_the_mask(chroma):
    """Rows past the mask are invisible (boolean masking), so trimming them is exact; and with
    gradient checkpointing on (whose single-stream blocks in diffusers drop the mask) a batch of
    different lengths still gives the same x0 and gradient."""
    g = torch.Generator().manual_seed(1)
    cond = chroma.encode_prompts(["a cat", "a red house with a tree"])
    junk = cond.crossattn + (1 - cond.mask[..., None]) * torch.randn(cond.crossattn.shape, generator=g)
    x = torch.randn(chroma.latent_shape(2, 32, 32), generator=g)
    t = torch.tensor([0.7, 0.7])
    d = chroma.denoiser
    with torch.no_grad():
        a = d(x, t, cond)
        b = d(x, t, Cond(junk, mask=cond.mask))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    def grad(ckpt):
        chroma.set_performance(checkpointing=ckpt)
        rows = cond.crossattn.clone().requires_grad_(True)
        out = d(x, t, Cond(rows, mask=cond.mask))
        out.square().sum().backward()
        return out.detach(), rows.grad

    try:
        o1, g1 = grad(False)
        o2, g2 = grad(True)
    finally:
        chroma.set_performance(checkpointing=False)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)
    assert not g1[cond.mask == 0].any()  # unread rows get no gradient: a trained negative keeps its zeros


def test_mask_in_the_file_and_other_t5_files(tmp_path, chroma):
    null, _ = chroma.null_embedding()
    path = save_embedding(tmp_path / "n.safetensors", NegEmbedding(null, "chroma"))
    emb = load_embedding(path, expected_family="chroma")
    assert emb.attention_mask.tolist() == [[1, 1] + [0] * 510] and emb.metadata["token_count"] == "512"
    # a bare pipeline tensor (every padding row as T5 makes it) implies the text and one padding row
    bare = torch.cat([null[:, :1], null[:, 1:2].expand(1, 511, -1)], dim=1)
    torch.save(bare, tmp_path / "bare.pt")
    assert load_embedding(tmp_path / "bare.pt", expected_family="chroma").mask().tolist() == [[1, 1] + [0] * 510]
    # PixArt files share the T5-XXL space: accepted for a Chroma model, with their own rows and mask
    pix = torch.cat([torch.randn(1, 1, 4096), torch.zeros(1, 119, 4096)], dim=1)
    save_embedding(tmp_path / "p.safetensors", NegEmbedding(pix, "pixart"))
    p = load_embedding(tmp_path / "p.safetensors", expected_family="chroma")
    c = chroma.negative_cond(p.model_rows(), None, p.mask())
    assert c.crossattn.shape == (1, 120, 4096) and c.mask.sum() == 1
    with pytest.raises(ValueError, match="at most 512"):
        chroma.negative_cond(torch.zeros(1, 600, 4096))
    # the authors' file layout: a learned end row, then T5's padding row for "" repeated (PixArt's 120)
    tok = chroma.tokenizer([""], padding="max_length", max_length=120, return_tensors="pt")
    with torch.no_grad():
        t5 = chroma.text_encoder(tok.input_ids, attention_mask=tok.attention_mask)[0].float()
    # T5's padding row for "" is the same at 120 tokens (PixArt-alpha) and at 512 (Chroma): the row Chroma reads
    torch.testing.assert_close(t5[0, 1], null[0, 1], rtol=1e-5, atol=1e-6)
    official = torch.cat([torch.randn(1, 1, 4096), t5[:, 1:2].expand(1, 119, -1)], dim=1).contiguous()
    torch.save(official, tmp_path / "official.bin")
    as_pixart = load_embedding(tmp_path / "official.bin", expected_family="pixart")
    assert as_pixart.family == "pixart" and as_pixart.mask().sum() == 1
    e = load_embedding(tmp_path / "official.bin", expected_family="chroma")
    assert e.family == "pixart" and e.mask().tolist() == [[1, 1] + [0] * 118]  # end row and one padding row
    c = chroma.negative_cond(e.model_rows(), None, e.mask())
    torch.testing.assert_close(c.crossattn[0, 1], null[0, 1], rtol=1e-5, atol=1e-6)
    # a file with its mask stored is read with it; zero rows are never taken for T5's padding row
    assert load_embedding(tmp_path / "p.safetensors", expected_family="chroma").mask().sum() == 1
    torch.save(pix, tmp_path / "zeros.bin")
    assert load_embedding(tmp_path / "zeros.bin", expected_family="chroma").mask().sum() == 1
    # an SD embedding is refused by name
    torch.save(torch.zeros(1, 77, 768), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="sd1 embedding .* the model in use is chroma"):
        load_embedding(tmp_path / "sd.pt", expected_family="chroma")


def _prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a red circle\na blue square\na green house\na black cat\na white dog\n")
    return str(p)


@pytest.mark.slow
def test_chroma_train_tune_and_eval_through_the_cli(tmp_path, chroma_dir, chroma, tiny_hps_ckpt, capsys):
    prompts = _prompts(tmp_path)
    out = tmp_path / "run"
    common = ["--model", chroma_dir, "--reward", f"hpsv2={tiny_hps_ckpt}", "--sampling-steps", "4"]
    common += ["--grad-range", "0", "1", "--resolution", "32", "--guidance", "5"]
    rc = main(
        ["train", *common, "--prompts", prompts, "--heldout-count", "2", "--out", str(out), "--steps", "3"]
        + ["--batch-size", "2", "--micro-batch", "2", "--lr", "0.05", "--eval-every", "3", "--no-progress"]
        + ["--handcrafted", "blurry"]
    )
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["family"] == "chroma" and set(summary["heldout"]) == {"null", "handcrafted", "learned", "diversity"}
    emb = load_embedding(out / "embedding.safetensors", expected_family="chroma")
    null, _ = chroma.null_embedding()
    # the two rows the model reads moved; the unread rows stayed zero; the mask is stored
    assert emb.tensor.shape == (1, 512, 4096) and not torch.allclose(emb.tensor[:, :2], null[:, :2])
    assert not emb.tensor[:, 2:].any() and emb.attention_mask.tolist() == [[1, 1] + [0] * 510]

    tuned = tmp_path / "tuned.safetensors"
    rc = main(
        ["tune", *common, "--prompt", "a red circle", "--seed", "1", "--max-steps", "2", "--patience", "2"]
        + ["--lr", "0.05", "--embedding", str(out / "embedding.safetensors"), "--out", str(tuned)]
    )
    assert rc == 0, capsys.readouterr().err
    t = load_embedding(tuned, expected_family="chroma")
    assert t.metadata["kind"] == "per-sample" and t.attention_mask.tolist() == [[1, 1] + [0] * 510]

    ev = tmp_path / "eval"
    negs = ["--negative", "null", "--negative", "handcrafted:blurry, ugly"]
    negs += ["--negative", f"learned={out / 'embedding.safetensors'}"]
    rc = main(["eval", *common, "--prompts", prompts, "--limit", "2", *negs, "--batch", "2", "--out", str(ev)])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((ev / "summary.json").read_text())
    assert [n["name"] for n in s["negatives"]] == ["null", "handcrafted", "learned"]
    assert s["images"] == {"null": 2, "handcrafted": 2, "learned": 2}


def test_comfyui_single_files_are_named_by_inspect_and_refused_alone(tmp_path, chroma, capsys):
    """The three files a ComfyUI Chroma user holds: the transformer (Flux's double/single blocks with a
    distilled_guidance_layer, ComfyUI's own test), the T5-XXL encoder (transformers layout), the Flux VAE."""
    from safetensors.torch import save_file

    from reneg.backends.diffusers_backend import ModelLoadError

    z = torch.zeros
    tr = {
        "img_in.weight": z(8, 64),
        "txt_in.weight": z(8, 4096),
        "distilled_guidance_layer.in_proj.weight": z(8, 64),
        "distilled_guidance_layer.norms.0.scale": z(8),
        **{f"double_blocks.{i}.img_attn.norm.key_norm.scale": z(4) for i in range(2)},
        **{f"single_blocks.{i}.linear1.weight": z(4, 8) for i in range(3)},
        **{f"single_blocks.{i}.norm.key_norm.scale": z(4) for i in range(3)},
        **{f"double_blocks.{i}.txt_mlp.0.weight": z(4, 8) for i in range(2)},
        **{f"double_blocks.{i}.img_mlp.0.weight": z(4, 8) for i in range(2)},
        **{f"double_blocks.{i}.img_attn.qkv.weight": z(12, 8) for i in range(2)},
    }
    save_file({k: v.to(torch.bfloat16) for k, v in tr.items()}, str(tmp_path / "chroma.safetensors"))
    t5 = {k: v.clone().contiguous() for k, v in chroma.text_encoder.state_dict().items()}
    save_file(t5, str(tmp_path / "t5.safetensors"))  # ComfyUI's t5xxl files: transformers' names
    vae = {f"decoder.up.{i}.block.0.conv1.weight": z(4, 4, 3, 3) for i in range(4)}
    vae.update({f"encoder.down.{i}.block.0.conv1.weight": z(4, 4, 3, 3) for i in range(4)})
    vae.update({"decoder.conv_in.weight": z(8, 16, 3, 3), "encoder.conv_out.weight": z(32, 8, 3, 3)})
    vae.update({f"decoder.mid.block_{i}.norm1.weight": z(8) for i in range(1, 3)})
    vae.update({f"encoder.mid.block_{i}.norm1.weight": z(8) for i in range(1, 10)})
    save_file(vae, str(tmp_path / "ae.safetensors"))
    expect = {
        "chroma.safetensors": ("Chroma transformer", "models/diffusion_models/", "2 double-stream and 3 single"),
        "t5.safetensors": ("T5-XXL text encoder", "models/text_encoders/", "1 layers, 4096 wide", "Chroma", "PixArt"),
        "ae.safetensors": ("16-channel autoencoder (ae)", "models/vae/", "16 channels", "Flux.1", "Chroma"),
    }
    for name, words in expect.items():
        assert main(["inspect", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        assert all(w in out for w in words), out
        # a part alone is refused; the transformer alone asks for its parts (they load: the test below)
        alone = (
            "needs its text encoder: pass --text-encoder"
            if name == "chroma.safetensors"
            else "on its own.*ChromaPipeline"
        )
        with pytest.raises(ModelLoadError, match=alone):
            load_diffusers(str(tmp_path / name))
    assert main(["inspect", "--json", str(tmp_path / "chroma.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "chroma" and info["kind"] == "transformer" and info["dtype"] == "bfloat16"
    assert info["comfy_folder"] == "diffusion_models"
    # under ComfyUI's checkpoint prefix; Chroma Radiance (pixel space) is named and not claimed as Chroma
    radiance = {"model.diffusion_model." + k: v for k, v in tr.items() if k != "img_in.weight"}
    radiance["model.diffusion_model.nerf_blocks.0.norm.scale"] = z(4)
    save_file(radiance, str(tmp_path / "radiance.safetensors"))
    assert main(["inspect", str(tmp_path / "radiance.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "Chroma Radiance" in out and "does not support" in out and "family chroma" not in out
    # Flux.1's transformer (guidance_in, no distilled_guidance_layer) is not called Chroma
    flux = {k: v for k, v in tr.items() if not k.startswith("distilled_guidance_layer.")}
    flux["guidance_in.in_layer.weight"] = z(8, 256)
    save_file(flux, str(tmp_path / "flux.safetensors"))
    with pytest.raises(ModelLoadError) as e:
        load_diffusers(str(tmp_path / "flux.safetensors"))
    assert "Chroma" not in str(e.value)


def test_comfyui_single_files_load_as_the_folder_does(tmp_path, chroma_dir, tiny_hps_ckpt, capsys):
    """A ComfyUI Chroma user's three files (the transformer in ComfyUI's layout, t5xxl, the ae in the LDM
    layout) inside a ComfyUI-shaped folder with its T5 tokenizer load into the model the ChromaPipeline folder
    of the same weights makes: the same rows, masks and images; ``reneg train`` takes them."""
    import os
    import shutil

    from diffusers import AutoencoderKL, ChromaTransformer2DModel
    from ldm_layout import vae_to_ldm
    from safetensors.torch import save_file

    from reneg.backends.diffusers_backend import ModelLoadError
    from reneg.backends.single_file.flux import bfl_to_diffusers
    from reneg.generate import generate
    from reneg.tiny import bfl_chroma_state_dict

    folder = tmp_path / "chroma-folder"
    shutil.copytree(chroma_dir, folder)
    bfl = bfl_chroma_state_dict(hidden=64, head_dim=32, approximator=(16, 32, 2), seed=5)
    tr = ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=32, num_attention_heads=2, joint_attention_dim=4096,
                                  axes_dims_rope=(4, 14, 14), approximator_num_channels=16,
                                  approximator_hidden_dim=32, approximator_layers=2)  # fmt: skip
    tr.load_state_dict(bfl_to_diffusers(bfl, 64), strict=True)  # diffusers' mapping (slow test), at 64 wide
    shutil.rmtree(folder / "transformer")
    tr.save_pretrained(folder / "transformer")
    models = tmp_path / "ComfyUI" / "models"
    for d in ("diffusion_models", "text_encoders", "vae"):
        (models / d).mkdir(parents=True)
    shutil.copytree(folder / "tokenizer", tmp_path / "ComfyUI" / "comfy" / "text_encoders" / "t5_tokenizer")
    transformer = str(models / "diffusion_models" / "chroma.safetensors")
    save_file({k: v.contiguous() for k, v in bfl.items()}, transformer)
    t5 = shutil.copy(folder / "text_encoder" / "model.safetensors", models / "text_encoders" / "t5xxl.safetensors")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    ae = str(models / "vae" / "ae.safetensors")
    save_file({k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config), prefix="").items()}, ae)

    a = load_diffusers(str(folder))
    b = load_diffusers(transformer, vae=ae, text_encoders=[str(t5)])
    assert b.family == "chroma" and b.model_info["kind"] == "single files (ComfyUI)"
    assert b.model_info["tokenizer"].endswith(os.path.join("comfy", "text_encoders", "t5_tokenizer"))
    prompts = ["a red circle", "a blue square on a green house"]
    ca, cb = a.encode_prompts(prompts), b.encode_prompts(prompts)
    assert torch.equal(ca.crossattn, cb.crossattn) and torch.equal(ca.mask, cb.mask)
    assert torch.equal(a.schedule(4), b.schedule(4))
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    ua, ub = a.encode_prompts(["blurry"]), b.encode_prompts(["blurry"])
    ia, ib = generate(a, ca, ua, noise, 4, 3.0), generate(b, cb, ub, noise, 4, 3.0)
    assert ia.abs().max() > 0 and torch.equal(ia, ib)

    from split_files import train_one_step

    parts = ["--text-encoder", str(t5), "--vae", ae]
    assert train_one_step(tmp_path, capsys, transformer, parts, tiny_hps_ckpt, prompts, 32) == "chroma"

    with pytest.raises(ModelLoadError, match=r"pass --text-encoder FILE once, for t5xxl"):
        load_diffusers(transformer, vae=ae)
    with pytest.raises(ModelLoadError, match=r"needs its autoencoder: pass --vae FILE"):
        load_diffusers(transformer, text_encoders=[str(t5)])
    with pytest.raises(ModelLoadError, match=r"--text-encoder .*ae.safetensors: .*Chroma reads t5xxl only"):
        load_diffusers(transformer, vae=ae, text_encoders=[ae])


@pytest.mark.slow
def test_the_transformer_mapping_equals_diffusers_own_at_the_released_width():
    """``bfl_to_diffusers`` gives exactly what diffusers' Chroma converter (3072 wide only) gives, on a
    ComfyUI-layout Chroma of the release's width and approximator with one block of each kind (bf16)."""
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    from reneg.backends.single_file.flux import bfl_to_diffusers
    from reneg.tiny import bfl_chroma_state_dict

    sd = bfl_chroma_state_dict(hidden=3072, head_dim=128, approximator=(64, 5120, 5), dtype=torch.bfloat16)
    ours = bfl_to_diffusers(sd, 3072)
    theirs = convert_chroma_transformer_checkpoint_to_diffusers(dict(sd))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
