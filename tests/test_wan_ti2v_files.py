"""Wan 2.2's own VAE file layout (``wan2.2_vae.safetensors``, Wan 2.2 TI2V 5B's): checked against the names and
shapes of ComfyUI's own ``WanVAE`` (``wan22_vae_comfyui_names.json``)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from reneg.backends.diffusers_backend import ModelLoadError
from reneg.backends.single_file.read import Checkpoint
from reneg.backends.single_file.wan_vae import (
    WAN22_LATENTS_MEAN,
    wan22_vae_config,
    wan22_vae_to_diffusers,
    wan_vae_layout,
)

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
