"""Wan 2.2 TI2V 5B from ComfyUI's split files (``wan2.2_ti2v_5B_fp16.safetensors``, ``umt5_xxl_fp16.safetensors``,
``wan2.2_vae.safetensors``): a small TI2V-shaped WanPipeline folder written as those files loads into the model the
folder makes (48 latent channels, Wan 2.2's residual VAE, ``expand_timesteps``, shift 5); the Wan 2.2 VAE layout is
checked against the names and shapes of ComfyUI's own ``WanVAE`` (``wan22_vae_comfyui_names.json``)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from reneg.backends.diffusers_backend import ModelLoadError
from reneg.backends.loading import load_diffusers, makes_videos
from reneg.backends.single_file.read import Checkpoint
from reneg.backends.single_file.wan_vae import (
    WAN22_LATENTS_MEAN,
    wan22_vae_config,
    wan22_vae_to_diffusers,
    wan_vae_layout,
)
from reneg.tiny import build_tiny_wan

NAMES = os.path.join(os.path.dirname(__file__), "wan22_vae_comfyui_names.json")


def _header(shapes: dict, path: str = "wan2.2_vae.safetensors") -> Checkpoint:
    return Checkpoint(path, {k: tuple(v) for k, v in shapes.items()}, dict.fromkeys(shapes, torch.float16))


@pytest.mark.parametrize("which", ["small", "release"])
def test_wan22_vae_layout_is_comfyuis(which):
    """ComfyUI's ``WanVAE`` (``comfy/ldm/wan/vae2_2.py``; its names and shapes kept in the json, at the release's
    configuration and at the small one the tests use) read from the shapes alone: the configuration is diffusers'
    (at the release: ``vae22_diffusers_config`` of diffusers' converter), every name lands on one of
    ``AutoencoderKLWan(is_residual=True)`` with its shape, and the tests' writer gives ComfyUI's names back."""
    from diffusers import AutoencoderKLWan
    from ldm_layout import vae_to_wan22

    with open(NAMES) as f:
        comfy = json.load(f)[which]["shapes"]
    ck = _header(comfy)
    assert wan_vae_layout(ck) == "2.2"
    cfg = wan22_vae_config(ck, "--vae wan2.2_vae.safetensors")
    want = {
        "small": dict(base_dim=8, decoder_base_dim=12, dim_mult=[1, 2, 2], num_res_blocks=1,
                      temperal_downsample=[False, True], scale_factor_temporal=2, scale_factor_spatial=8),
        "release": dict(base_dim=160, decoder_base_dim=256, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                        temperal_downsample=[False, True, True], scale_factor_temporal=4, scale_factor_spatial=16),
    }[which]  # fmt: skip
    want.update(z_dim=48, is_residual=True, in_channels=12, out_channels=12, patch_size=2, attn_scales=[])
    assert {k: cfg[k] for k in want} == want and cfg["latents_mean"] == WAN22_LATENTS_MEAN
    with torch.device("meta"):
        ours = AutoencoderKLWan(**cfg).state_dict()
    got = wan22_vae_to_diffusers({k: torch.empty(v, device="meta") for k, v in comfy.items()})
    assert sorted(got) == sorted(ours)
    assert all(tuple(got[k].shape) == tuple(ours[k].shape) for k in ours)
    back = vae_to_wan22(ours)
    assert {k: list(v.shape) for k, v in back.items()} == comfy


def test_wan22_vae_layout_refusals(tmp_path):
    with open(NAMES) as f:
        comfy = json.load(f)["small"]["shapes"]
    with pytest.raises(ModelLoadError, match=r"x.safetensors: not a Wan VAE file: expected Wan 2.1's layout .*Wan "
                                             r"2.2's .*found 2 tensors such as"):  # fmt: skip
        wan22_vae_config(_header({"a.weight": [1], "b.weight": [2]}, "x.safetensors"), "x.safetensors")
    uneven = {k: v for k, v in comfy.items() if not k.startswith("decoder.upsamples.1.upsamples.1.")}
    with pytest.raises(ModelLoadError, match=r"uneven levels \(encoder \[1, 1, 1\], decoder \[2, 1, 2\]"):
        wan22_vae_config(_header(uneven), "v")
    z16 = dict(comfy, **{"decoder.conv1.weight": [24, 16, 3, 3, 3]})
    with pytest.raises(ModelLoadError, match=r"16 latent channels; the Wan 2.2 VAE makes 48"):
        wan22_vae_config(_header(z16), "v")


def _write_files(folder: str, root) -> dict:
    """The folder's parts as ComfyUI keeps Wan 2.2 TI2V 5B: the transformer in Wan's layout, UMT5, the VAE in
    Wan 2.2's layout."""
    from diffusers import AutoencoderKLWan
    from ldm_layout import transformer_to_wan, vae_to_wan22
    from safetensors.torch import load_file, save_file

    models = root / "models"
    for d in ("diffusion_models", "text_encoders", "vae"):
        (models / d).mkdir(parents=True, exist_ok=True)
    out = {
        "transformer": str(models / "diffusion_models" / "wan2.2_ti2v_5B_fp16.safetensors"),
        "umt5": str(models / "text_encoders" / "umt5_xxl_fp16.safetensors"),
        "vae": str(models / "vae" / "wan2.2_vae.safetensors"),
    }
    sd = load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
    save_file({k: v.contiguous() for k, v in transformer_to_wan(sd).items()}, out["transformer"])
    save_file(load_file(os.path.join(folder, "text_encoder", "model.safetensors")), out["umt5"])
    vae = AutoencoderKLWan.from_pretrained(os.path.join(folder, "vae"))
    save_file({k: v.contiguous() for k, v in vae_to_wan22(vae.state_dict()).items()}, out["vae"])
    return out


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti2v")
    folder = build_tiny_wan(str(root / "folder"), seed=7, head_dim=128, ti2v=True)
    return folder, _write_files(folder, root / "ComfyUI")


def test_ti2v_split_files_load_as_the_folder_does(ti2v):
    """``--model wan2.2_ti2v_5B --text-encoder umt5_xxl --vae wan2.2_vae`` is the folder's model: the same VAE
    configuration and weights, ``expand_timesteps``, the scheduler at shift 5, the same prompt rows, 3-step
    5-frame videos ``torch.equal`` to the folder's and the same decoded frames."""
    from reneg.generate import generate

    folder, f = ti2v
    tok = os.path.join(folder, "tokenizer")
    a = load_diffusers(folder, frames=5)
    b = load_diffusers(f["transformer"], text_encoders=[f["umt5"]], vae=f["vae"], tokenizer=tok, frames=5)
    assert b.model_info["kind"] == "single files (ComfyUI)" and b.family == "wan" and b.experts == 1
    assert a.model_info["expand_timesteps"] is True and b.model_info["expand_timesteps"] is True
    assert b.denoiser.expand_timesteps and b.scheduler_config["flow_shift"] == a.scheduler_config["flow_shift"] == 5.0
    assert {k: b.scheduler_config[k] for k in b.scheduler_config} == {
        k: a.scheduler_config[k] for k in b.scheduler_config
    }
    assert {k: v for k, v in b.vae.config.items() if not k.startswith("_")} == {
        k: v for k, v in a.vae.config.items() if not k.startswith("_")
    }
    ta, tb = ({k: tuple(v) if isinstance(v, list) else v for k, v in m.config.items()} for m in (a.unet, b.unet))
    assert [k for k in ta if not k.startswith("_") and ta[k] != tb[k]] == [
        "rope_max_seq_len"
    ]  # 32 and 1024: same rotations
    for x, y in ((a.vae, b.vae), (a.transformer, b.transformer)):
        sa, sb = x.state_dict(), y.state_dict()
        assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.latent_shape(2, 32, 32) == a.latent_shape(2, 32, 32) == (2, 48, 3, 4, 4)
    prompts = ["a red circle", "a blue square on a green house"]
    ca, cb = a.encode_prompts(prompts), b.encode_prompts(prompts)
    assert torch.equal(ca.crossattn, cb.crossattn) and torch.equal(a.schedule(3), b.schedule(3))
    noise = torch.randn(*a.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(1))
    xa = generate(a, ca, a.encode_prompts(["blurry"]), noise, 3, 5.0)
    xb = generate(b, cb, b.encode_prompts(["blurry"]), noise, 3, 5.0)
    assert xa.abs().max() > 0 and torch.equal(xa, xb)
    z = torch.randn(1, 48, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    fa, fb = a.decode(z), b.decode(z)
    assert fa.shape == (5, 3, 32, 32) and torch.equal(fa, fb)
    assert makes_videos(f["transformer"]) and not makes_videos(f["vae"])


def test_ti2v_files_are_named_by_inspect_and_each_vae_goes_with_its_transformer(ti2v, tmp_path, capsys):
    """``reneg inspect`` names the TI2V transformer and Wan 2.2's VAE; the VAE alone as ``--model`` is refused with
    what to pass; the Wan 2.1 VAE beside the TI2V transformer, Wan 2.2's beside a Wan 2.1 one, a file of neither
    layout as ``--vae`` and ``--low-noise-model`` beside TI2V are refused by flag before any weight is read."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from ldm_layout import transformer_to_wan, vae_to_wan21, write_header_only
    from safetensors.torch import save_file

    from reneg.cli import main

    folder, f = ti2v
    tok = os.path.join(folder, "tokenizer")
    assert main(["inspect", f["transformer"]]) == 0
    out = capsys.readouterr().out
    assert "Wan 2.2 TI2V-shaped (48 latent channels) transformer" in out and "wan2.2_vae" in out, out
    release = str(tmp_path / "wan2.2_ti2v_5B_fp16.safetensors")  # the release's shapes, header only
    shapes = {"patch_embedding.weight": (3072, 48, 1, 2, 2), "text_embedding.0.weight": (3072, 4096),
              "head.modulation": (1, 2, 3072), "blocks.0.ffn.0.weight": (14336, 3072), "blocks.29.norm3.weight": (3072,)}  # fmt: skip
    assert main(["inspect", write_header_only(release, shapes)]) == 0
    out = capsys.readouterr().out
    assert "the Wan 2.2 TI2V 5B (used for text to video) transformer" in out and "30 blocks 3072 wide (24 heads" in out
    assert main(["inspect", f["vae"]]) == 0
    out = capsys.readouterr().out
    assert "the Wan 2.2 VAE (Wan 2.2 TI2V 5B's" in out and "models/vae/" in out and "--vae wan2.2_vae" in out, out
    assert main(["inspect", "--json", f["vae"]]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["part"] == "vae" and info["family"] == "wan" and info["comfyui_folder"] == "models/vae"
    with pytest.raises(ModelLoadError, match=r"the Wan 2.2 VAE .*one part of a Wan model on its own"):
        load_diffusers(f["vae"])

    torch.manual_seed(0)
    wan21_vae = str(tmp_path / "wan_2.1_vae.safetensors")
    v21 = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])  # fmt: skip
    save_file({k: v.contiguous() for k, v in vae_to_wan21(v21.state_dict(), dict(v21.config)).items()}, wan21_vae)
    t21 = str(tmp_path / "wan2.1_t2v_1.3B_fp16.safetensors")
    m21 = WanTransformer3DModel(num_attention_heads=1, attention_head_dim=128, num_layers=1, ffn_dim=32,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)  # fmt: skip
    save_file({k: v.contiguous() for k, v in transformer_to_wan(m21.state_dict()).items()}, t21)
    with pytest.raises(ModelLoadError, match=r"--vae .*wan_2.1_vae.safetensors: the Wan 2.1 VAE's layout, 16 latent "
                                             r"channels; --model .*\(Wan 2.2 TI2V 5B\) reads 48 .*wan2.2_vae"):  # fmt: skip
        load_diffusers(f["transformer"], text_encoders=[f["umt5"]], vae=wan21_vae, tokenizer=tok)
    with pytest.raises(ModelLoadError, match=r"--vae .*wan2.2_vae.safetensors: the Wan 2.2 VAE's layout, 48 latent "
                                             r"channels; .* reads 16 .*wan_2.1_vae"):  # fmt: skip
        load_diffusers(t21, text_encoders=[f["umt5"]], vae=f["vae"], tokenizer=tok)
    with pytest.raises(ModelLoadError, match=r"--vae .*umt5_xxl_fp16.safetensors: not a Wan VAE file: expected Wan "
                                             r"2.1's layout .*found \d+ tensors such as .*reads wan2.2_vae"):  # fmt: skip
        load_diffusers(f["transformer"], text_encoders=[f["umt5"]], vae=f["umt5"], tokenizer=tok)
    with pytest.raises(ModelLoadError, match=r"--low-noise-model .*Wan 2.2 TI2V 5B, one transformer"):
        load_diffusers(f["transformer"], text_encoders=[f["umt5"]], vae=f["vae"], tokenizer=tok,
                       low_noise_model=f["transformer"])  # fmt: skip
    with pytest.raises(ModelLoadError, match=r"needs its VAE: pass --vae FILE .*models/vae/wan2.2_vae.safetensors"):
        load_diffusers(f["transformer"], text_encoders=[f["umt5"]], tokenizer=tok)


def test_reneg_train_runs_on_the_ti2v_files(ti2v, tmp_path, tiny_hps_ckpt, capsys):
    from split_files import train_one_step

    folder, f = ti2v
    parts = ["--text-encoder", f["umt5"], "--vae", f["vae"], "--tokenizer", os.path.join(folder, "tokenizer")]
    parts += ["--guidance", "5"]
    assert train_one_step(tmp_path, capsys, f["transformer"], parts, tiny_hps_ckpt, ["a red circle"], 16) == "wan"
