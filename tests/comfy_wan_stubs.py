"""Stand-ins for ComfyUI's Wan 2.1 / 2.2 objects around a small Wan diffusers folder (see comfy_stubs.py
for the other models): a MODEL whose model sampling is ComfyUI's ``ModelSamplingDiscreteFlow`` + ``CONST``
(``comfy/model_sampling.py``: sigma = flow time, shift 8 for Wan 2.1, timestep = 1000 sigma, x0 = x - sigma v),
the ``Wan21`` latent format (3 latent dimensions, ``latents_mean`` / ``latents_std``), a VAE whose decode
returns ``[B, 3, F, H, W]``, and the UMT5 CLIP (``comfy/text_encoders/wan.py``: padded with token 0 to at
least 512 tokens, encoded with the attention mask, masked rows zeroed, no pooled vector)."""

from __future__ import annotations

import os
import types

import torch

from comfy_stubs import FirstStage, ModelPatcher, to_inference_tensors


class CONST:  # ComfyUI's name: ComfyBackend recognises flow models by it
    def calculate_input(self, sigma, noise):
        return noise

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        return model_input - model_output * sigma


class ModelSamplingDiscreteFlow(torch.nn.Module):
    def __init__(self, shift: float = 8.0, multiplier: float = 1000):
        super().__init__()
        self.shift, self.multiplier = shift, multiplier
        self.register_buffer("sigmas", self.sigma(torch.arange(1, 1001, 1) / 1000 * multiplier))

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        t = timestep / self.multiplier
        return self.shift * t / (1 + (self.shift - 1) * t)


class WanModelSampling(ModelSamplingDiscreteFlow, CONST):
    pass


class Wan21LatentFormat:
    latent_channels = 16
    latent_dimensions = 3

    scale_factor = 1.0

    def __init__(self, mean, std):
        # made when the model loads, inside the prompt's inference mode, as ComfyUI's Wan21 format makes them
        with torch.inference_mode():
            self.latents_mean = torch.tensor(mean).view(1, 16, 1, 1, 1)
            self.latents_std = torch.tensor(std).view(1, 16, 1, 1, 1)

    def process_out(self, latent):  # comfy/latent_formats.py Wan21.process_out
        latents_mean = self.latents_mean.to(latent.device, latent.dtype)
        latents_std = self.latents_std.to(latent.device, latent.dtype)
        return latent * latents_std / self.scale_factor + latents_mean


class WanModel(torch.nn.Module):
    def __init__(self, transformer, vae_config: dict, shift: float = 8.0):
        super().__init__()
        self.diffusion_model = transformer
        self.model_sampling = WanModelSampling(shift)
        self.latent_format = Wan21LatentFormat(vae_config["latents_mean"], vae_config["latents_std"])
        self.model_config = types.SimpleNamespace(unet_config={"image_model": "wan2.1", "model_type": "t2v"})
        self.adm_channels = 0
        self.calls = 0

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        self.calls += 1
        xc = self.model_sampling.calculate_input(t, x)
        out = self.diffusion_model(
            hidden_states=xc,
            timestep=self.model_sampling.timestep(t).float(),
            encoder_hidden_states=c_crossattn.to(xc.dtype),
            return_dict=False,
        )[0].float()
        return self.model_sampling.calculate_denoised(t, out, x)

    def process_latent_out(self, latent):
        return self.latent_format.process_out(latent)


class WanVAE:
    def __init__(self, vae):
        self.first_stage_model = FirstStage(vae)  # decode: [B, 3, F, H, W] for the Wan VAE
        self.vae_dtype = torch.float32
        self.device = torch.device("cpu")
        self.patcher = ModelPatcher(self.first_stage_model)

    def spacial_compression_decode(self):
        return 8

    def temporal_compression_decode(self):
        return 4


class WanCLIP:
    def __init__(self, text_encoder, tokenizer):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer

    def tokenize(self, text):
        ids = self.tokenizer([text], return_tensors="pt").input_ids  # the prompt's tokens and </s>
        n = max(512, ids.shape[1])
        mask = torch.zeros(1, n, dtype=torch.long)
        mask[:, : ids.shape[1]] = 1
        return torch.cat([ids, ids.new_zeros(1, n - ids.shape[1])], dim=1), mask

    def encode_from_tokens_scheduled(self, tokens, add_dict=None):
        ids, mask = tokens
        out = self.text_encoder(ids, attention_mask=mask).last_hidden_state.float()
        out = out * mask[..., None].to(out.dtype)  # zero_out_masked
        return [[out, {"pooled_output": None, **(add_dict or {})}]]


def tiny_comfy_wan_models(folder: str, expert: str = "transformer"):
    """(MODEL, VAE, CLIP) as ComfyUI would hand them to a node, from a small WanPipeline folder."""
    import json

    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    tr = WanTransformer3DModel.from_pretrained(folder, subfolder=expert).eval()
    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae").eval()
    te = UMT5EncoderModel.from_pretrained(folder, subfolder="text_encoder").eval()
    tok = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    with open(os.path.join(folder, "vae", "config.json")) as f:
        cfg = json.load(f)
    base = to_inference_tensors(WanModel(tr, cfg))
    return ModelPatcher(base), WanVAE(to_inference_tensors(vae)), WanCLIP(to_inference_tensors(te), tok)
