"""Qwen-Image through the diffusers backend, on a small ``QwenImagePipeline`` folder with Qwen-Image's
real conditioning sizes (Qwen2.5-VL rows 3584 wide with a mask, the chat template split as Qwen2.5's
tokenizer splits it, 64 packed latent channels, the flow-matching scheduler config), loaded the way a
user's folder is."""

from __future__ import annotations

import json

import pytest
import torch

import comfy_stubs

from reneg.backends.loading import load_diffusers
from reneg.backends.qwen_image import DROP, TEMPLATE, pack, template_prefix_length, unpack
from reneg.cli import main
from reneg.cond import Cond
from reneg.embedding import load_embedding
from reneg.generate import text_negative
from reneg.sampling import initial_latent, sample

SIZE = 32  # px: a 16 x 16 latent, 64 packed tokens


@pytest.fixture(scope="module")
def qwen_dir(tiny_qwen_image_dir):
    return tiny_qwen_image_dir


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return load_diffusers(qwen_dir)


@pytest.fixture(scope="module")
def pipe(qwen_dir):
    from diffusers import QwenImagePipeline

    p = QwenImagePipeline.from_pretrained(qwen_dir, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_prompt_rows_are_the_pipelines_and_the_template_cut_is_comfyuis(qwen, pipe):
    prompts = ["a red cat", "a photo of a dog in the city street", ""]
    ref, ref_mask = pipe.encode_prompt(prompts, device="cpu")
    ours = qwen.encode_prompts(prompts)
    assert ours.crossattn.shape == ref.shape and ours.crossattn.shape[-1] == 3584
    torch.testing.assert_close(ours.mask, ref_mask)
    torch.testing.assert_close(ours.crossattn, ref.float(), rtol=1e-5, atol=1e-5)
    # the empty prompt is the template's tail: <|im_end|> \n <|im_start|> assistant \n
    assert ours.mask[2].sum() == 5 and qwen.null_mask().tolist() == [[1] * 5 + [0] * 123]
    tok = qwen.tokenizer
    assert template_prefix_length(tok) == DROP == pipe.prompt_template_encode_start_idx == 34
    assert TEMPLATE == pipe.prompt_template_encode
    ids = tok(TEMPLATE.format("a red cat"))["input_ids"]
    special = tok.convert_tokens_to_ids(["<|im_start|>", "user"])
    assert comfy_stubs.comfy_qwen_template_end(ids, special[0], special[1], tok("\n")["input_ids"][0]) == DROP


def _pipeline_latents(pipe, pos, noise, steps, **neg):
    out = pipe(
        prompt_embeds=pos.crossattn,
        prompt_embeds_mask=pos.mask,
        latents=pack(noise),
        num_inference_steps=steps,
        true_cfg_scale=4.0,
        height=SIZE,
        width=SIZE,
        output_type="latent",
        **neg,
    ).images
    return out


def _ours(backend, cond, uncond, noise, steps, denoiser=None):
    backend.latent_shape(noise.shape[0], SIZE, SIZE)
    sigmas = backend.schedule(steps)
    x, _ = sample(denoiser or backend.denoiser, initial_latent(noise, sigmas[0], True), sigmas, cond, uncond, 4.0)
    return x


def test_sampler_matches_qwen_image_pipeline_with_text_and_learned_negatives(qwen, pipe):
    prompts = ["a red cat", "a photo of a dog in the city street"]
    pos = qwen.encode_prompts(prompts)
    noise = torch.randn(2, 16, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
    steps = 4
    # a text negative, the way train and eval make one
    rows, _ = text_negative(qwen, " ")
    ours = _ours(qwen, pos, qwen.negative_cond(rows), noise, steps)
    ref = _pipeline_latents(pipe, pos, noise, steps, negative_prompt=[" ", " "])
    assert _rel(pack(ours), ref) < 1e-4
    # a learned negative as its file holds it: 128 rows, the first 20 read, the rest masked padding
    neg = torch.randn(1, 128, 3584, generator=torch.Generator().manual_seed(1))
    neg[:, 20:] = 0
    mask = torch.tensor([[1] * 20 + [0] * 108])
    ours = _ours(qwen, pos, qwen.negative_cond(neg, mask=mask), noise, steps)
    ref = _pipeline_latents(
        pipe,
        pos,
        noise,
        steps,
        negative_prompt_embeds=neg.expand(2, -1, -1),
        negative_prompt_embeds_mask=mask.expand(2, -1),
    )
    assert _rel(pack(ours), ref) < 1e-4
    # the pipeline's norm rescale is part of it: plain CFG on the velocity lands elsewhere
    plain = _ours(
        qwen, pos, qwen.negative_cond(neg, mask=mask), noise, steps, denoiser=lambda x, s, c: qwen.denoiser(x, s, c)
    )
    assert _rel(pack(plain), ref) > 1e-3
    # the decoded image is the pipeline's (its [0, 1] output)
    img = pipe(
        prompt_embeds=pos.crossattn[:1],
        prompt_embeds_mask=pos.mask[:1],
        negative_prompt_embeds=neg,
        negative_prompt_embeds_mask=mask,
        latents=pack(noise[:1]),
        num_inference_steps=steps,
        true_cfg_scale=4.0,
        height=SIZE,
        width=SIZE,
        output_type="pt",
    ).images
    with torch.no_grad():
        mine = (
            qwen.decode(_ours(qwen, pos.index(slice(0, 1)), qwen.negative_cond(neg, mask=mask), noise[:1], steps)) + 1
        ) / 2
    torch.testing.assert_close(mine.clamp(0, 1), img, rtol=1e-4, atol=1e-4)


def test_schedule_is_the_pipelines_dynamic_shift(qwen, pipe):
    import numpy as np

    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    for size in (32, 64):
        qwen.latent_shape(1, size, size)
        c = pipe.scheduler.config
        seq = (size // (2 * qwen.vae_scale)) ** 2  # packed tokens: the tiny VAE scales by 2, the real one by 8
        mu = calculate_shift(seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
        torch.testing.assert_close(qwen.schedule(6).float(), pipe.scheduler.sigmas)
    assert float(qwen.schedule(6)[-2]) == pytest.approx(0.02)  # shift_terminal


def test_masked_padding_is_the_same_as_no_padding(qwen):
    """A negative's masked rows are not read: its 128-row file, its kept rows alone (what ComfyUI's
    conditioning holds) and the rows padded to a longer prompt give one denoiser output."""
    neg = torch.randn(1, 128, 3584, generator=torch.Generator().manual_seed(2))
    neg[:, 9:] = 0
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.6])
    with torch.no_grad():
        full = qwen.denoiser(x, t, qwen.negative_cond(neg))
        kept = qwen.denoiser(x, t, Cond(neg[:, :9]))
        long = Cond.cat([qwen.negative_cond(neg), qwen.encode_prompts(["a " * 150])]).index(slice(0, 1))
        assert long.crossattn.shape[1] > 128
        padded = qwen.denoiser(x, t, long)
    torch.testing.assert_close(full, kept, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded, kept, rtol=1e-5, atol=1e-5)


def test_pack_unpack_round_trip():
    x = torch.randn(2, 16, 6, 4)
    assert torch.equal(unpack(pack(x), 6, 4), x)


def test_folder_errors_name_the_file(qwen_dir, tmp_path):
    import shutil

    from reneg.backends.diffusers_backend import ModelLoadError

    bad = tmp_path / "Qwen-Image"
    shutil.copytree(qwen_dir, bad)
    shutil.rmtree(bad / "text_encoder")
    with pytest.raises(
        ModelLoadError, match=r"Qwen-Image: not a complete diffusers QwenImagePipeline folder; missing text_encoder"
    ):
        load_diffusers(str(bad))


def _wan_vae(z: int, wan22: bool = False) -> dict:
    """A Wan-layout VAE's header as ComfyUI's VAE files have it (zeros: only keys and shapes are read)."""
    z0 = torch.zeros
    sd = {"conv1.weight": z0(2 * z, 2 * z, 1, 1, 1), "conv2.weight": z0(z, z, 1, 1, 1)}
    sd["encoder.conv1.weight"] = z0(8, 3, 3, 3, 3)
    sd["decoder.conv1.weight"] = z0(32, z, 3, 3, 3)
    sd["encoder.head.0.gamma"], sd["encoder.head.2.weight"] = z0(32, 1, 1, 1), z0(2 * z, 32, 3, 3, 3)
    sd["decoder.head.0.gamma"], sd["decoder.head.2.weight"] = z0(8, 1, 1, 1), z0(3, 8, 3, 3, 3)
    for i in range(2):
        for side in ("encoder", "decoder"):
            sd[f"{side}.middle.{2 * i}.residual.0.gamma"] = z0(32, 1, 1, 1)
            sd[f"{side}.middle.{2 * i}.residual.2.weight"] = z0(32, 32, 3, 3, 3)
        sd[f"encoder.downsamples.{i}.residual.0.gamma"] = z0(8, 1, 1, 1)
        sd[f"decoder.upsamples.{i}.residual.0.gamma"] = z0(32, 1, 1, 1)
    if wan22:  # Wan 2.2's VAE (48 channels, 16x): ComfyUI tells it from Wan 2.1's by this key
        sd["decoder.upsamples.0.upsamples.0.residual.2.weight"] = z0(32, 32, 3, 3, 3)
    return sd


def test_comfyui_single_files_are_named_and_refused_clearly(qwen_dir, tmp_path, capsys):
    """The three files a ComfyUI Qwen-Image user holds, named by ``reneg inspect``; the text encoder or the VAE
    as ``--model`` is refused naming the part, the transformer alone asks for its parts. The folder's transformer and text encoder files
    are in the layouts ComfyUI's are (diffusers' transformer names; transformers' Qwen2.5-VL names,
    ``model.layers.N`` and ``visual.*``), so they are used as they are; the VAE is a Wan-layout header."""
    from safetensors.torch import load_file, save_file

    from reneg.backends.diffusers_backend import ModelLoadError

    transformer = f"{qwen_dir}/transformer/diffusion_pytorch_model.safetensors"
    prefixed = str(tmp_path / "qwen_image_bf16.safetensors")
    sd = load_file(transformer)
    save_file({f"model.diffusion_model.{k}": v.to(torch.bfloat16) for k, v in sd.items()}, prefixed)
    vae, wan22 = str(tmp_path / "qwen_image_vae.safetensors"), str(tmp_path / "wan2.2_vae.safetensors")
    save_file(_wan_vae(16), vae)
    save_file(_wan_vae(48, wan22=True), wan22)
    want = {
        transformer: ("transformer", "1 MMDiT blocks 32 wide (2 heads of 16)", "float32"),
        prefixed: ("transformer", "text rows 3584 wide", "bfloat16, keys under 'model.diffusion_model.'"),
        f"{qwen_dir}/text_encoder/model.safetensors": ("text_encoder", "Qwen2.5-VL-7B", "1 layers, 3584 wide"),
        vae: ("vae", "16 channels, 8x spatial", "Wan 2.1"),
    }
    for path, (part, *words) in want.items():
        assert main(["inspect", path]) == 0
        out = capsys.readouterr().out
        assert out.startswith(path) and "Qwen-Image part" in out and all(w in out for w in words), out
        assert "QwenImagePipeline folder" in out and "ComfyUI keeps it in models/" in out, out
        assert main(["inspect", "--json", path]) == 0
        info = json.loads(capsys.readouterr().out)
        assert (info["part"], info["family"]) == (part, "qwen-image") and info["parameters"] > 0, info
        with pytest.raises(ModelLoadError) as e:
            load_diffusers(path)
        msg = str(e.value)
        if part == "transformer":  # loads with its parts (the next test); alone, it asks for them
            assert msg.startswith(f"{path}: a Qwen-Image transformer file needs its text encoder"), msg
            continue
        assert msg.startswith(f"{path}: the ") and "one part of a Qwen-Image model" in msg, msg
        assert "diffusers QwenImagePipeline folder" in msg and "--text-encoder qwen_2.5_vl_7b" in msg, msg
    # Wan 2.2's VAE has the same middle block but is not Qwen-Image's: not named as one
    with pytest.raises(ModelLoadError) as e:
        load_diffusers(wan22)
    assert str(e.value).startswith(wan22) and "Qwen-Image" not in str(e.value)


def test_wan21_vae_mapping_equals_diffusers_own_at_the_released_config():
    """``wan21_vae_to_diffusers`` renames the Wan 2.1 layout exactly as diffusers' ``convert_wan_vae_to_diffusers``
    (written for the released configuration only) does, at that configuration; and it round-trips at the test
    folder's two-level one, which diffusers' function gets wrong. Only names are compared (meta tensors)."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from ldm_layout import vae_to_wan21

    from reneg.backends.single_file.wan_vae import wan21_vae_to_diffusers

    released = dict(
        base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]
    )
    small = dict(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False])
    for cfg in (released, small):
        with torch.device("meta"):
            sd = AutoencoderKLQwenImage(**cfg).state_dict()
        wan = vae_to_wan21(sd, cfg)
        assert len(wan) == len(sd) and any(k.startswith("decoder.upsamples.") for k in wan)
        ours = wan21_vae_to_diffusers(wan)
        assert sorted(ours) == sorted(sd) and all(ours[k] is sd[k] for k in sd)
        if cfg is released:
            theirs = convert_wan_vae_to_diffusers(wan)
            assert sorted(theirs) == sorted(ours) and all(theirs[k] is ours[k] for k in ours)
        else:  # diffusers' fixed block numbers put a two-level decoder's blocks elsewhere
            assert sorted(convert_wan_vae_to_diffusers(wan)) != sorted(sd)


def test_comfyui_single_files_load_as_the_folder_does(tmp_path, tiny_hps_ckpt, capsys):
    """A ComfyUI Qwen-Image user's three files (the transformer under ComfyUI's prefix, qwen_2.5_vl_7b in its
    ``model.*`` / ``visual.*`` layout, the VAE in the Wan 2.1 layout) inside a ComfyUI-shaped folder with its
    qwen25_tokenizer load into the model the QwenImagePipeline folder of the same weights makes: the same rows,
    masks, schedule and images; ``reneg train`` takes them; each missing part is asked for by its flag."""
    import os
    import shutil

    from diffusers import AutoencoderKLQwenImage
    from ldm_layout import vae_to_wan21
    from safetensors.torch import load_file, save_file

    from reneg.backends.diffusers_backend import ModelLoadError
    from reneg.generate import generate
    from reneg.tiny import build_tiny_qwen_image

    folder = build_tiny_qwen_image(str(tmp_path / "qwen-folder"), seed=3, head_dim=128)
    comfy = tmp_path / "ComfyUI"
    models = comfy / "models"
    for d in ("diffusion_models", "text_encoders", "vae"):
        (models / d).mkdir(parents=True)
    shutil.copytree(os.path.join(folder, "tokenizer"), comfy / "comfy" / "text_encoders" / "qwen25_tokenizer")
    transformer = str(models / "diffusion_models" / "qwen_image.safetensors")
    sd = load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, transformer)
    te = str(shutil.copy(os.path.join(folder, "text_encoder", "model.safetensors"),
                         models / "text_encoders" / "qwen_2.5_vl_7b.safetensors"))  # fmt: skip
    vae = AutoencoderKLQwenImage.from_pretrained(os.path.join(folder, "vae"))
    vae_file = str(models / "vae" / "qwen_image_vae.safetensors")
    save_file({k: v.contiguous() for k, v in vae_to_wan21(vae.state_dict(), dict(vae.config)).items()}, vae_file)

    a = load_diffusers(folder)
    b = load_diffusers(transformer, vae=vae_file, text_encoders=[te])
    assert b.family == "qwen-image" and b.model_info["kind"] == "single files (ComfyUI)"
    assert b.model_info["tokenizer"].endswith(os.path.join("comfy", "text_encoders", "qwen25_tokenizer"))
    assert not any(n.startswith("visual") for n, _ in b.text_encoder.named_parameters())  # the tower is not read
    prompts = ["a red circle", "a blue square on a green house"]
    ca, cb = a.encode_prompts(prompts), b.encode_prompts(prompts)
    assert torch.equal(ca.mask, cb.mask) and _rel(cb.crossattn, ca.crossattn) < 1e-5
    assert torch.equal(a.null_mask(), b.null_mask()) and _rel(b.null_embedding()[0], a.null_embedding()[0]) < 1e-5
    assert torch.equal(a.schedule(4), b.schedule(4))
    noise = torch.randn(2, 16, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(1))
    ua, ub = a.encode_prompts(["blurry"]), b.encode_prompts(["blurry"])
    ia, ib = generate(a, ca, ua, noise, 4, 4.0), generate(b, cb, ub, noise, 4, 4.0)
    assert ia.abs().max() > 0 and _rel(ib, ia) < 1e-4

    from split_files import train_one_step

    parts = ["--text-encoder", te, "--vae", vae_file]
    assert train_one_step(tmp_path, capsys, transformer, parts, tiny_hps_ckpt, prompts, SIZE) == "qwen-image"

    with pytest.raises(ModelLoadError, match=r"pass --text-encoder FILE once, for Qwen2.5-VL-7B"):
        load_diffusers(transformer, vae=vae_file)
    with pytest.raises(ModelLoadError, match=r"needs its VAE: pass --vae FILE"):
        load_diffusers(transformer, text_encoders=[te])
    with pytest.raises(ModelLoadError, match=r"--text-encoder .*qwen_image_vae.safetensors: the Qwen-Image VAE"):
        load_diffusers(transformer, vae=vae_file, text_encoders=[vae_file])
    with pytest.raises(ModelLoadError, match=r"--vae .*qwen_2.5_vl_7b.safetensors: the Qwen2.5-VL-7B text encoder"):
        load_diffusers(transformer, vae=te, text_encoders=[te])
    outside = shutil.copy(transformer, tmp_path / "qwen_image.safetensors")  # no ComfyUI around it
    with pytest.raises(ModelLoadError, match=r"Qwen2.5's tokenizer is not in these files; pass --tokenizer FOLDER"):
        load_diffusers(str(outside), vae=vae_file, text_encoders=[str(shutil.copy(te, tmp_path / "te.safetensors"))])
    c = load_diffusers(str(outside), vae=os.path.join(folder, "vae"), text_encoders=[te],
                       tokenizer=os.path.join(folder, "tokenizer"))  # fmt: skip
    assert torch.equal(c.encode_prompts(prompts).crossattn, cb.crossattn)


def _prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")))
    return str(p)


@pytest.mark.slow
def test_qwen_image_train_tune_and_eval_through_the_cli(tmp_path, qwen_dir, qwen, tiny_hps_ckpt, capsys):
    prompts = _prompts(tmp_path)
    out = tmp_path / "run"
    common = ["--model", qwen_dir, "--reward", f"hpsv2={tiny_hps_ckpt}", "--sampling-steps", "4"]
    common += ["--grad-range", "0", "1", "--resolution", str(SIZE), "--guidance", "4"]
    rc = main(
        ["train", *common, "--prompts", prompts, "--heldout-count", "2", "--out", str(out), "--steps", "3"]
        + ["--batch-size", "2", "--micro-batch", "2", "--lr", "0.05", "--eval-every", "3", "--no-progress"]
        + ["--handcrafted", "blurry"]
    )
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["family"] == "qwen-image"
    assert set(summary["heldout"]) == {"null", "handcrafted", "learned", "diversity"}
    emb = load_embedding(out / "embedding.safetensors", expected_family="qwen-image")
    null, _ = qwen.null_embedding()
    # 128 rows; from the empty prompt only its 5 rows move, and the file says so in its mask
    assert emb.tensor.shape == (1, 128, 3584) and not torch.allclose(emb.tensor[:, :5], null[:, :5])
    assert torch.equal(emb.tensor[:, 5:], null[:, 5:]) and emb.attention_mask.tolist() == [[1] * 5 + [0] * 123]

    tuned = tmp_path / "tuned.safetensors"
    rc = main(
        ["tune", *common, "--prompt", "a red circle", "--seed", "1", "--max-steps", "2", "--patience", "2"]
        + ["--lr", "0.05", "--embedding", str(out / "embedding.safetensors"), "--out", str(tuned)]
    )
    assert rc == 0, capsys.readouterr().err
    t = load_embedding(tuned, expected_family="qwen-image")
    assert t.metadata["kind"] == "per-sample" and t.attention_mask.tolist() == [[1] * 5 + [0] * 123]

    ev = tmp_path / "eval"
    negs = ["--negative", "null", "--negative", "handcrafted:blurry, ugly"]
    negs += ["--negative", f"learned={out / 'embedding.safetensors'}"]
    rc = main(
        [
            "eval",
            *common,
            "--prompts",
            prompts,
            "--limit",
            "2",
            *negs,
            "--batch",
            "2",
            "--out",
            str(ev),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    s = json.loads((ev / "summary.json").read_text())
    assert [n["name"] for n in s["negatives"]] == ["null", "handcrafted", "learned"]
    assert s["images"] == {"null": 2, "handcrafted": 2, "learned": 2}
