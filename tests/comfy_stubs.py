"""Stand-ins for ComfyUI's ``folder_paths`` and ``comfy.*``, exactly as far as the ReNeg nodes use them,
and ComfyUI-shaped wrappers (MODEL, VAE, CLIP) around the tiny diffusers models.

No package on the registry ships ComfyUI's ``comfy`` code, so the tests install these
modules into ``sys.modules``, load the pack by path the way ComfyUI's ``nodes.py`` does,
and remove everything again afterwards.

Semantics kept from ComfyUI (autumn 2025):
- ``folder_paths.folder_names_and_paths[name] = (paths, extensions)``; an empty extension
  set lists every file; ``get_full_path`` searches the paths in order.
- ``model.model.apply_model(x, sigma, c_crossattn=...)`` takes sigma, feeds the UNet
  ``x / sqrt(1 + sigma^2)`` at the *nearest* table timestep, and returns x0 for eps and v models.
- ``ModelSamplingDiscrete`` sigmas from the SD "linear" (sqrt-spaced) betas; ``ddim_uniform``
  as ``comfy.samplers.ddim_scheduler``.
- The weights of models ComfyUI loads are inference tensors (it loads them inside
  ``torch.inference_mode()``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import torch

STUB_NAMES = (
    "folder_paths",
    "comfy",
    "comfy.model_management",
    "comfy.utils",
    "comfy.samplers",
    "comfy.model_sampling",
)


# --- folder_paths -------------------------------------------------------------------------
def _folder_paths(models_dir: str) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.models_dir = models_dir
    fp.folder_names_and_paths = {
        "checkpoints": ([os.path.join(models_dir, "checkpoints")], {".safetensors", ".ckpt"}),
    }

    def get_folder_paths(name):
        return fp.folder_names_and_paths[name][0][:]

    def get_filename_list(name):
        paths, exts = fp.folder_names_and_paths[name]
        out = set()
        for root in paths:
            if not os.path.isdir(root):
                continue
            for here, _dirs, files in os.walk(root, followlinks=True):
                for f in files:
                    rel = os.path.relpath(os.path.join(here, f), root)
                    if not exts or os.path.splitext(f)[1].lower() in exts:
                        out.add(rel)
        return sorted(out)

    def get_full_path(name, filename):
        if name not in fp.folder_names_and_paths:
            return None
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for root in fp.folder_names_and_paths[name][0]:
            p = os.path.join(root, filename)
            if os.path.isfile(p):
                return p
        return None

    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    return fp


# --- comfy.* ------------------------------------------------------------------------------
class InterruptProcessingException(Exception):
    pass


def _comfy() -> dict[str, types.ModuleType]:
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []

    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException
    mm.interrupt_processing = False
    mm.load_calls = []
    mm.empty_cache_calls = 0

    def interrupt_current_processing(value=True):
        mm.interrupt_processing = value

    def processing_interrupted():
        return mm.interrupt_processing

    def throw_exception_if_processing_interrupted():
        if mm.interrupt_processing:
            mm.interrupt_processing = False
            raise InterruptProcessingException()

    def load_models_gpu(
        models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, force_full_load=False
    ):
        mm.load_calls.append((list(models), memory_required, force_full_load))

    def soft_empty_cache(force=False):
        mm.empty_cache_calls += 1

    mm.interrupt_current_processing = interrupt_current_processing
    mm.processing_interrupted = processing_interrupted
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.load_models_gpu = load_models_gpu
    mm.soft_empty_cache = soft_empty_cache
    mm.get_torch_device = lambda: torch.device("cpu")

    utils = types.ModuleType("comfy.utils")
    utils.PROGRESS_BAR_HOOK = None

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current, self.hook = total, 0, utils.PROGRESS_BAR_HOOK

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            if self.hook is not None:
                self.hook(self.current, self.total, preview)

        def update(self, value):
            self.update_absolute(self.current + value)

    utils.ProgressBar = ProgressBar

    samplers = types.ModuleType("comfy.samplers")

    def ddim_scheduler(model_sampling, steps):
        s = model_sampling
        x = 1
        sigs = [0.0]
        ss = max(len(s.sigmas) // steps, 1)
        while x < len(s.sigmas):
            sigs.append(float(s.sigmas[x]))
            x += ss
        return torch.FloatTensor(sigs[::-1])

    def simple_scheduler(model_sampling, steps):
        s = model_sampling
        ss = len(s.sigmas) / steps
        return torch.FloatTensor([float(s.sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0])

    def calculate_sigmas(model_sampling, scheduler_name, steps):
        if scheduler_name == "simple":
            return simple_scheduler(model_sampling, steps)
        if scheduler_name != "ddim_uniform":
            raise ValueError(f"error invalid scheduler {scheduler_name}")
        return ddim_scheduler(model_sampling, steps)

    samplers.SCHEDULER_NAMES = [
        "simple",
        "sgm_uniform",
        "karras",
        "exponential",
        "ddim_uniform",
        "beta",
        "normal",
        "linear_quadratic",
        "kl_optimal",
    ]
    samplers.calculate_sigmas = calculate_sigmas
    model_sampling = types.ModuleType("comfy.model_sampling")
    model_sampling.CONST = CONST
    comfy.model_management, comfy.utils, comfy.samplers = mm, utils, samplers
    comfy.model_sampling = model_sampling
    return {
        "comfy": comfy,
        "comfy.model_management": mm,
        "comfy.utils": utils,
        "comfy.samplers": samplers,
        "comfy.model_sampling": model_sampling,
    }


class CONST:
    """``comfy.model_sampling.CONST``: flow matching, ``x_t = (1 - t) x0 + t eps``, the model predicts
    the velocity and sees ``x_t`` unscaled; sigma is t."""

    def calculate_input(self, sigma, noise):
        return noise

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return sigma * noise + (1.0 - sigma) * latent_image


class Host:
    """The installed stubs: ``host.fp`` (folder_paths), ``host.mm``, ``host.utils``."""

    def __init__(self, models_dir: str):
        self.models_dir = models_dir
        self.saved = {n: sys.modules.get(n) for n in STUB_NAMES}
        self.fp = _folder_paths(models_dir)
        mods = _comfy()
        self.mm, self.utils = mods["comfy.model_management"], mods["comfy.utils"]
        sys.modules["folder_paths"] = self.fp
        sys.modules.update(mods)
        self.packs: list[str] = []

    def load_pack(self, pack_dir: str):
        """What ComfyUI's ``nodes.load_custom_node`` does with a package folder."""
        name = pack_dir.replace(".", "_x_")
        spec = importlib.util.spec_from_file_location(name, os.path.join(pack_dir, "__init__.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        self.packs.append(name)
        return module

    def close(self) -> None:
        for name in list(sys.modules):
            if any(name == p or name.startswith(p + ".") for p in self.packs):
                del sys.modules[name]
        for n, m in self.saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


# --- ComfyUI-shaped models around the tiny diffusers pipeline ---------------------------
def to_inference_tensors(module: torch.nn.Module) -> torch.nn.Module:
    """Make every parameter and buffer an inference tensor, as a ComfyUI load leaves them
    (checked on a real ComfyUI: all UNet and VAE weights inference tensors, requires_grad True)."""
    with torch.inference_mode():
        for sub in module.modules():
            for n, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[n] = torch.nn.Parameter(p.detach().clone(), requires_grad=True)
            for n, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[n] = b.clone()
    return module


class ModelSamplingDiscrete(torch.nn.Module):
    def __init__(
        self,
        prediction: str = "eps",
        timesteps: int = 1000,
        start: float = 0.00085,
        end: float = 0.012,
        linear: bool = False,
    ):
        super().__init__()
        betas = (
            torch.linspace(start, end, timesteps, dtype=torch.float64)
            if linear  # ComfyUI's "sqrt_linear"
            else torch.linspace(start**0.5, end**0.5, timesteps, dtype=torch.float64) ** 2
        )
        ac = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - ac) / ac) ** 0.5
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())
        self.prediction = prediction
        self.sigma_data = 1.0

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def calculate_input(self, sigma, x):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (x.ndim - 1))
        return x / (sigma**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma, model_output, x):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        if self.prediction == "eps":
            return x - model_output * sigma
        d = self.sigma_data
        return x * d**2 / (sigma**2 + d**2) - model_output * sigma * d / (sigma**2 + d**2) ** 0.5


class LatentFormat:
    latent_channels = 4

    def __init__(self, scale_factor: float):
        self.scale_factor = scale_factor


class BaseModel(torch.nn.Module):
    """``model.model`` of a ComfyUI MODEL around a diffusers UNet2DConditionModel."""

    def __init__(self, unet, prediction: str, scale_factor: float):
        super().__init__()
        self.diffusion_model = unet
        self.model_sampling = ModelSamplingDiscrete(prediction)
        self.latent_format = LatentFormat(scale_factor)
        self.model_config = types.SimpleNamespace(unet_config={"context_dim": unet.config.cross_attention_dim})
        self.adm_channels = 0
        self.calls = 0

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        self.calls += 1
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        ts = self.model_sampling.timestep(t).float()
        out = _with_comfy_patches(
            self.diffusion_model,
            transformer_options,
            lambda: self.diffusion_model(xc, ts, encoder_hidden_states=c_crossattn.to(xc.dtype), return_dict=False)[0],
        ).float()
        return self.model_sampling.calculate_denoised(sigma, out, x)

    def process_latent_out(self, latent):
        return latent / self.latent_format.scale_factor


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.load_device = torch.device("cpu")
        self.model_options = {"transformer_options": {}}

    def clone(self):
        import copy

        n = ModelPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        return n


class _ComfyAttn2:
    """ComfyUI's BasicTransformerBlock cross-attention path with its patches (comfy/ldm/modules/attention.py):
    ``attn2_patch`` functions on (n, context, value), then, where ``patches_replace["attn2"]`` has the
    block, to_q/to_k/to_v, the replacement on (q, k, v, extra_options) and to_out; else the plain attention."""

    def __init__(self, base, key, transformer_options):
        self.base, self.key, self.to = base, key, transformer_options

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        if encoder_hidden_states is None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)
        extra = {k: v for k, v in self.to.items() if k not in ("patches", "patches_replace")}
        extra.update(n_heads=attn.heads, dim_head=attn.inner_dim // attn.heads, attn_precision=None)
        n, context, value = hidden_states, encoder_hidden_states, None
        patches = self.to.get("patches", {}).get("attn2_patch", [])
        if patches:
            value = context
            for p in patches:
                n, context, value = p(n, context, value, extra)
        replace = self.to.get("patches_replace", {}).get("attn2", {})
        if self.key in replace:
            value = context if value is None else value
            out = replace[self.key](attn.to_q(n), attn.to_k(context), attn.to_v(value), extra)
            return attn.to_out[1](attn.to_out[0](out))
        return self.base(attn, n, context, attention_mask, **kw)


def _with_comfy_patches(unet, transformer_options, run):
    """Run ``run()`` with the UNet's cross-attentions following ComfyUI's patch protocol, when
    ``transformer_options`` carries patches (ComfyUI's own UNet always does; the diffusers UNet of
    these stubs is given processors that do for the call)."""
    if not transformer_options.get("patches") and not transformer_options.get("patches_replace"):
        return run()
    procs = unet.attn_processors
    keyed = {}
    for i, (name, p) in enumerate(procs.items()):
        keyed[name] = _ComfyAttn2(p, ("block", i, 0), transformer_options) if ".attn2." in name else p
    unet.set_attn_processor(keyed)
    try:
        return run()
    finally:
        unet.set_attn_processor(procs)

    def get_model_object(self, name):
        return getattr(self.model, name)


class FirstStage(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def decode(self, z):
        return self.vae.decode(z, return_dict=False)[0]


class VAE:
    def __init__(self, vae):
        self.first_stage_model = FirstStage(vae)
        self.vae_dtype = torch.float32
        self.device = torch.device("cpu")
        self.patcher = ModelPatcher(self.first_stage_model)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def spacial_compression_decode(self):
        return self.factor


class CLIP:
    def __init__(self, text_encoder, tokenizer):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer

    def tokenize(self, text):
        return self.tokenizer(
            [text], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids

    def encode_from_tokens_scheduled(self, tokens):
        out = self.text_encoder(tokens)
        return [[out.last_hidden_state.float(), {"pooled_output": out.pooler_output.float()}]]


class SDXLModel(BaseModel):
    """``model.model`` of an SDXL-style ComfyUI MODEL: reads ``y``, the ADM vector that
    ``encode_adm`` builds from the pooled text vector and the six size numbers, in ComfyUI's
    order (height, width, crop_h, crop_w, target_height, target_width). ComfyUI embeds the
    numbers itself; this stand-in passes them raw to the diffusers UNet, which embeds them."""

    def __init__(self, unet, prediction: str, scale_factor: float, pooled: int):
        super().__init__(unet, prediction, scale_factor)
        self.pooled = pooled
        self.adm_channels = pooled + 6
        self.adm_calls = []

    def encode_adm(self, **kwargs):
        self.adm_calls.append({k: v for k, v in kwargs.items() if k != "pooled_output"})
        pooled = kwargs["pooled_output"]  # ComfyUI's SDXL raises KeyError without it, too
        w, h = kwargs.get("width", 768), kwargs.get("height", 768)
        nums = [
            h,
            w,
            kwargs.get("crop_h", 0),
            kwargs.get("crop_w", 0),
            kwargs.get("target_height", h),
            kwargs.get("target_width", w),
        ]
        flat = torch.tensor([nums], dtype=torch.float32).repeat(pooled.shape[0], 1)
        return torch.cat([pooled.float().to(flat.device), flat], dim=1)

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        self.calls += 1
        y = kwargs["y"]
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        ts = self.model_sampling.timestep(t).float()
        added = {"text_embeds": y[:, : self.pooled].to(xc.dtype), "time_ids": y[:, self.pooled :].to(xc.dtype)}
        out = self.diffusion_model(
            xc, ts, encoder_hidden_states=c_crossattn.to(xc.dtype), added_cond_kwargs=added, return_dict=False
        )[0].float()
        return self.model_sampling.calculate_denoised(sigma, out, x)


class SDXLCLIP:
    """CLIP of an SDXL checkpoint: both encoders' penultimate layers side by side, bigG's pooled projection."""

    def __init__(self, te, tok, te2, tok2):
        self.parts = ((te, tok), (te2, tok2))

    def tokenize(self, text):
        return [
            tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            for _, tok in self.parts
        ]

    def encode_from_tokens_scheduled(self, tokens):
        hidden = []
        for (te, _), ids in zip(self.parts, tokens):
            out = te(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
        return [[torch.cat(hidden, -1), {"pooled_output": out.text_embeds.float()}]]


def tiny_comfy_sdxl_models(sdxl_dir: str):
    """(MODEL, VAE, CLIP) as ComfyUI would hand them to a node, from a small SDXL diffusers folder."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(sdxl_dir, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(sdxl_dir, subfolder="vae").eval()
    te = CLIPTextModel.from_pretrained(sdxl_dir, subfolder="text_encoder").eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(sdxl_dir, subfolder="text_encoder_2").eval()
    tok = CLIPTokenizer.from_pretrained(sdxl_dir, subfolder="tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(sdxl_dir, subfolder="tokenizer_2")
    with open(os.path.join(sdxl_dir, "vae", "config.json")) as f:
        scale = float(json.load(f).get("scaling_factor", 0.13025))
    base = to_inference_tensors(SDXLModel(unet, "eps", scale, int(te2.config.projection_dim)))
    return (
        ModelPatcher(base),
        VAE(to_inference_tensors(vae)),
        SDXLCLIP(to_inference_tensors(te), tok, to_inference_tensors(te2), tok2),
    )


def tiny_comfy_models(pipeline_dir: str, prediction: str = "eps"):
    """(MODEL, VAE, CLIP) as ComfyUI would hand them to a node, from a tiny diffusers folder."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae").eval()
    te = CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(pipeline_dir, subfolder="tokenizer")
    with open(os.path.join(pipeline_dir, "vae", "config.json")) as f:
        scale = float(json.load(f).get("scaling_factor", 0.18215))
    base = to_inference_tensors(BaseModel(unet, prediction, scale))
    vae = VAE(to_inference_tensors(vae))
    return ModelPatcher(base), vae, CLIP(to_inference_tensors(te), tok)


class PixArtModel(BaseModel):
    """``model.model`` of a ComfyUI PixArt MODEL (``supported_models.PixArtAlpha``/``PixArtSigma``):
    linear betas 0.0001..0.02, ``unet_config["image_model"]``, conditioning rows read without a mask
    (every row counts), size conditioning through ``c_size``/``c_ar`` with ComfyUI's fallback (the
    latent's size x 8), only the noise half of the learned-sigma output."""

    def __init__(self, transformer, scale_factor: float, sigma: bool = False):
        torch.nn.Module.__init__(self)
        self.diffusion_model = transformer
        self.latent_format = LatentFormat(scale_factor)
        self.adm_channels = 0
        self.calls = 0
        self.model_sampling = ModelSamplingDiscrete("eps", start=0.0001, end=0.02, linear=True)
        self.model_config = types.SimpleNamespace(
            unet_config={"image_model": "pixart_sigma" if sigma else "pixart_alpha"}
        )
        self.size_calls = []

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        self.calls += 1
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        ts = self.model_sampling.timestep(t).float()
        b, _, h, w = x.shape
        c_size, c_ar = kwargs.get("c_size"), kwargs.get("c_ar")
        self.size_calls.append(None if c_size is None else c_size.tolist())
        if c_size is None:
            c_size = torch.tensor([[h * 8, w * 8]], dtype=x.dtype).repeat(b, 1)
        if c_ar is None:
            c_ar = torch.tensor([[h / w]], dtype=x.dtype).repeat(b, 1)
        added = {"resolution": c_size.to(xc.dtype).expand(b, 2), "aspect_ratio": c_ar.to(xc.dtype).expand(b, 1)}
        if not self.diffusion_model.use_additional_conditions:
            added = {"resolution": None, "aspect_ratio": None}
        out = self.diffusion_model(
            xc, encoder_hidden_states=c_crossattn.to(xc.dtype), timestep=ts, added_cond_kwargs=added, return_dict=False
        )[0].float()
        return self.model_sampling.calculate_denoised(sigma, out[:, : x.shape[1]], x)


class T5CLIP:
    """CLIP of a ComfyUI PixArt checkpoint (``comfy/text_encoders/pixart_t5.py``): T5 unpadded, the
    prompt's tokens and ``</s>`` (at least one token), no mask, no pooled vector."""

    def __init__(self, text_encoder, tokenizer):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer

    def tokenize(self, text):
        return self.tokenizer([text], return_tensors="pt").input_ids

    def encode_from_tokens_scheduled(self, tokens, add_dict=None):
        out = self.text_encoder(tokens)[0].float()
        return [[out, {"pooled_output": None, **(add_dict or {})}]]


def tiny_comfy_pixart_models(folder: str, sigma: bool = False):
    """(MODEL, VAE, CLIP) as ComfyUI would hand them to a node, from a small PixArt diffusers folder."""
    import json

    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    tr = PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    te = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder").eval()
    tok = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    with open(os.path.join(folder, "vae", "config.json")) as f:
        scale = float(json.load(f).get("scaling_factor", 0.18215))
    base = to_inference_tensors(PixArtModel(tr, scale, sigma))
    return ModelPatcher(base), VAE(to_inference_tensors(vae)), T5CLIP(to_inference_tensors(te), tok)


class LTXVT5CLIP(T5CLIP):
    """CLIP of ComfyUI's LTX-Video (``comfy/text_encoders/lt.py`` over ``genmo.py``): the same T5, padded to at
    least 128 tokens, encoded with the attention mask, the mask handed on in the conditioning."""

    def tokenize(self, text):
        t = self.tokenizer([text], padding="max_length", max_length=128, return_tensors="pt")
        return t.input_ids, t.attention_mask

    def encode_from_tokens_scheduled(self, tokens, add_dict=None):
        ids, mask = tokens
        out = self.text_encoder(ids, attention_mask=mask)[0].float()
        return [[out, {"pooled_output": None, "attention_mask": mask, **(add_dict or {})}]]


# --- Qwen-Image ---------------------------------------------------------------------------
class ModelSamplingFlux(CONST, torch.nn.Module):
    """``comfy.model_sampling.ModelSamplingFlux`` with CONST, what ``supported_models.QwenImage`` gets
    (ModelType.FLUX, ``shift`` 1.15): sigma(t) = e^shift / (e^shift + 1/t - 1) on 10,000 steps, and the
    timestep the model reads is sigma itself."""

    def __init__(self, shift: float = 1.15, timesteps: int = 10000):
        torch.nn.Module.__init__(self)
        self.shift = shift
        self.register_buffer("sigmas", self.sigma(torch.arange(1, timesteps + 1, 1) / timesteps))

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        return sigma

    def sigma(self, t):
        import math

        return math.exp(self.shift) / (math.exp(self.shift) + (1 / t - 1))


class Wan21LatentFormat:
    """``latent_formats.Wan21`` (Qwen-Image's): 16 channels, video latents (``latent_dimensions`` 3),
    ``process_out`` = latent * std + mean per channel."""

    latent_channels = 16
    latent_dimensions = 3
    scale_factor = 1.0

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(1, 16, 1, 1, 1)
        self.std = torch.tensor(std).view(1, 16, 1, 1, 1)

    def process_out(self, latent):
        return latent * self.std.to(latent) / self.scale_factor + self.mean.to(latent)


class QwenImageModel(torch.nn.Module):
    """``model.model`` of a ComfyUI Qwen-Image MODEL (``model_base.QwenImage``) around a diffusers
    ``QwenImageTransformer2DModel``: latents ``[B, 16, 1, h, w]``, every conditioning row read (ComfyUI's
    Qwen-Image attention takes no text mask), ``unet_config["image_model"] = "qwen_image"``."""

    def __init__(self, transformer, latents_mean, latents_std):
        super().__init__()
        self.diffusion_model = transformer
        self.model_sampling = ModelSamplingFlux()
        self.latent_format = Wan21LatentFormat(latents_mean, latents_std)
        self.model_config = types.SimpleNamespace(unet_config={"image_model": "qwen_image"})
        self.adm_channels = 0
        self.calls = []

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        from reneg.backends.qwen_image import pack, unpack

        self.calls.append(tuple(c_crossattn.shape))
        b, c, _, h, w = x.shape
        xc = self.model_sampling.calculate_input(t, x)[:, :, 0]
        out = self.diffusion_model(
            hidden_states=pack(xc),
            timestep=self.model_sampling.timestep(t).float(),
            encoder_hidden_states=c_crossattn.float(),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return self.model_sampling.calculate_denoised(t, unpack(out, h, w).unsqueeze(2).float(), x)

    def process_latent_out(self, latent):
        return self.latent_format.process_out(latent)


class QwenImageVAE(VAE):
    """The Qwen-Image VAE as ComfyUI holds it (the Wan 2.1 VAE): ``first_stage_model.decode`` takes
    ``[B, 16, T, h, w]`` and gives ``[B, 3, T, H, W]``."""

    def __init__(self, vae):
        self.first_stage_model = FirstStage(vae)
        self.vae_dtype = torch.float32
        self.device = torch.device("cpu")
        self.patcher = ModelPatcher(self.first_stage_model)
        self.factor = 2 ** len(vae.config.temperal_downsample)
        self.latent_dim = 3


def comfy_qwen_template_end(ids: list[int], im_start: int, user: int, newline: int) -> int:
    """Where ComfyUI's ``QwenImageTEModel.encode_token_weights`` (comfy/text_encoders/qwen_image.py)
    cuts the template: at the second ``<|im_start|>``, plus 3 when ``user`` and ``\\n`` follow it."""
    end, seen = -1, 0
    for i, t in enumerate(ids):
        if t == im_start and seen < 2:
            end, seen = i, seen + 1
    if len(ids) > end + 3 and ids[end + 1] == user and ids[end + 2] == newline:
        end += 3
    return end


class QwenCLIP:
    """CLIP of ComfyUI's Qwen-Image (``comfy/text_encoders/qwen_image.py``): the prompt in the chat template
    (left alone when it starts with ``<|im_start|>``), one sequence without padding, the language model's
    last layer after its final norm, cut where :func:`comfy_qwen_template_end` says, no mask (ComfyUI drops
    an all-ones mask) and no pooled vector."""

    def __init__(self, text_encoder, tokenizer):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer

    def tokenize(self, text):
        from reneg.backends.qwen_image import TEMPLATE

        text = text if text.startswith("<|im_start|>") else TEMPLATE.format(text)
        return self.tokenizer([text], return_tensors="pt").input_ids

    def encode_from_tokens_scheduled(self, tokens, add_dict=None):
        tok = self.tokenizer
        ids = tokens[0].tolist()
        im_start, user = tok.convert_tokens_to_ids(["<|im_start|>", "user"])
        end = comfy_qwen_template_end(ids, im_start, user, tok("\n")["input_ids"][0])
        hidden = self.text_encoder.model(input_ids=tokens, output_hidden_states=True).hidden_states[-1]
        return [[hidden[:, end:].float(), {"pooled_output": None, **(add_dict or {})}]]


def tiny_comfy_qwen_image_models(folder: str):
    """(MODEL, VAE, CLIP) as ComfyUI would hand them to a node, from a small QwenImagePipeline folder."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tr = QwenImageTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    vae = AutoencoderKLQwenImage.from_pretrained(folder, subfolder="vae").eval()
    te = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, subfolder="text_encoder").eval()
    tok = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    base = to_inference_tensors(QwenImageModel(tr, vae.config.latents_mean, vae.config.latents_std))
    return ModelPatcher(base), QwenImageVAE(to_inference_tensors(vae)), QwenCLIP(to_inference_tensors(te), tok)


class FluxCLIP:
    """CLIP of ComfyUI's Flux (``comfy/text_encoders/flux.py``): T5-XXL padded with the pad token to at
    least 256 tokens (``min_length=256``, no end-token padding) and encoded without a mask, and CLIP-L's
    pooled output (``return_projected_pooled=False``) of the prompt padded to 77; CLIPTextEncodeFlux adds
    ``guidance`` to the dict (``add_dict``)."""

    def __init__(self, clip, clip_tok, t5, t5_tok):
        self.clip, self.clip_tok, self.t5, self.t5_tok = clip, clip_tok, t5, t5_tok

    def tokenize(self, text):
        ids = self.t5_tok([text], return_tensors="pt").input_ids
        if ids.shape[1] < 256:
            ids = torch.cat([ids, torch.zeros(1, 256 - ids.shape[1], dtype=ids.dtype)], dim=1)
        return {"l": self.clip_tok([text], padding="max_length", max_length=77, return_tensors="pt").input_ids,
                "t5xxl": ids}  # fmt: skip

    def encode_from_tokens_scheduled(self, tokens, add_dict=None):
        rows = self.t5(tokens["t5xxl"])[0].float()
        pooled = self.clip(tokens["l"]).pooler_output.float()
        return [[rows, {"pooled_output": pooled, **(add_dict or {})}]]


def tiny_comfy_flux_clip(folder: str) -> FluxCLIP:
    """The CLIP ComfyUI makes of Flux's ``clip_l`` and ``t5xxl`` files, from a small Flux diffusers folder."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    clip = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2").eval()
    return FluxCLIP(
        to_inference_tensors(clip),
        CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        to_inference_tensors(t5),
        AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer_2")),
    )
