"""Diffusers backend: SD1.x / SD2.x (eps and v-prediction) and SDXL from local files.

Loads a diffusers folder (``model_index.json`` with ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``, and for SDXL also
``text_encoder_2/`` and ``tokenizer_2/``) or a single-file ``.safetensors``
checkpoint as UI users keep them (then ``config=`` must name a local diffusers
folder of the same architecture, since diffusers would otherwise download the
configs). Nothing is ever downloaded.

SDXL (FIELD-NOTES 3): the cross-attention conditioning is both encoders'
penultimate hidden states side by side, ``[B, 77, 768 + 1280]``; the UNet also
reads the second encoder's projected pooled vector ``[B, 1280]`` and six size
numbers ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``. The
denoiser derives the size numbers from the latent it is given, as diffusers'
``StableDiffusionXLPipeline`` does by default (no crop, original = target size).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..cond import Cond
from ..families import family_for_hidden
from ..sampling import ddim_schedule, sigmas_from_alphas_cumprod


class ModelLoadError(ValueError):
    pass


class DiffusersDenoiser:
    """``D(x, sigma, cond) -> x0`` around a diffusers UNet (FIELD-NOTES 2)."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 vae_scale: int = 8):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ModelLoadError(f"prediction type {prediction_type!r} is not supported "
                                 f"(epsilon and v_prediction are)")
        self.unet = unet
        self.prediction_type = prediction_type
        self.log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log().float()
        # SDXL-style UNets read a pooled text vector and size conditioning ("text_time")
        self.text_time = getattr(unet.config, "addition_embed_type", None) == "text_time"
        self.vae_scale = int(vae_scale)
        self._time_ids: tuple | None = None  # (key, tensor): made once per size, not on every UNet call

    def added_cond(self, x: torch.Tensor, cond: Cond) -> dict | None:
        """``added_cond_kwargs`` for an SDXL UNet: the pooled vector and ``time_ids``.

        ``time_ids`` come from ``cond.extra`` when a caller set them, otherwise from the
        latent's size: ``(H, W, 0, 0, H, W)`` in pixels, the pipeline's default."""
        if not self.text_time:
            return None
        if cond.pooled is None:
            raise ValueError("this SDXL UNet needs a pooled text vector in its conditioning; none was given")
        dt = self.unet.dtype
        tid = cond.extra.get("time_ids")
        if tid is None:
            h, w = x.shape[-2] * self.vae_scale, x.shape[-1] * self.vae_scale
            key = (h, w, x.device, dt)
            if self._time_ids is None or self._time_ids[0] != key:
                self._time_ids = (key, torch.tensor([[h, w, 0, 0, h, w]], dtype=dt, device=x.device))
            tid = self._time_ids[1].expand(x.shape[0], 6)
        extra = {k: v.to(dt) for k, v in cond.extra.items() if k != "time_ids"}
        return {"text_embeds": cond.pooled.to(dt), "time_ids": tid.to(dt), **extra}

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep for ``sigma`` (log-sigma interpolation; exact on the table)."""
        if self.log_sigmas.device != sigma.device:
            # moved once: a copy from pageable host memory on every call would sync the CUDA
            # stream before each UNet call and stall the CPU that queues the next kernels
            self.log_sigmas = self.log_sigmas.to(sigma.device)
        ls = self.log_sigmas
        s = sigma.float().clamp(min=1e-10).log()
        idx = torch.searchsorted(ls, s.contiguous()).clamp(1, len(ls) - 1)
        lo, hi = ls[idx - 1], ls[idx]
        w = ((s - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1).float() + w

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        s = sigma.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        c_in = 1 / (1 + s * s).sqrt()
        dt = self.unet.dtype
        kwargs = {}
        added = self.added_cond(x, cond)
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        out = self.unet((x * c_in).to(dt), self.timestep(sigma), encoder_hidden_states=cond.crossattn.to(dt),
                        return_dict=False, **kwargs)[0].to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - s * out
        return x * c_in * c_in - s * c_in * out


@dataclass
class DiffusersBackend:
    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    scheduler_config: dict
    family: str
    source: str
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    text_encoder_2: object = None  # SDXL: CLIPTextModelWithProjection (OpenCLIP bigG)
    tokenizer_2: object = None

    def __post_init__(self):
        ac = self.alphas_cumprod()
        self._denoiser = DiffusersDenoiser(self.unet, ac, self.scheduler_config.get("prediction_type", "epsilon"),
                                           self.vae_scale)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._null: tuple[torch.Tensor, torch.Tensor | None] | None = None

    # --- schedule -------------------------------------------------------------------------
    def alphas_cumprod(self) -> torch.Tensor:
        c = self.scheduler_config
        n = int(c.get("num_train_timesteps", 1000))
        b0, b1 = float(c.get("beta_start", 0.00085)), float(c.get("beta_end", 0.012))
        kind = c.get("beta_schedule", "scaled_linear")
        if c.get("trained_betas") is not None:
            betas = torch.tensor(c["trained_betas"], dtype=torch.float32)
        elif kind == "scaled_linear":
            betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float32) ** 2
        elif kind == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float32)
        else:
            raise ModelLoadError(f"{self.source}: beta_schedule {kind!r} is not supported")
        return torch.cumprod(1.0 - betas, dim=0)

    def schedule(self, steps: int) -> torch.Tensor:
        c = self.scheduler_config
        return ddim_schedule(self.alphas_cumprod(), steps, int(c.get("steps_offset", 1)),
                             c.get("timestep_spacing", "leading"), bool(c.get("set_alpha_to_one", False)))

    # --- model ----------------------------------------------------------------------------
    @property
    def denoiser(self) -> DiffusersDenoiser:
        return self._denoiser

    @property
    def prediction_type(self) -> str:
        return self._denoiser.prediction_type

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int | None:
        """The image size the UNet was made for (``sample_size`` x the VAE factor): SD1.5 512, SDXL 1024."""
        s = getattr(self.unet.config, "sample_size", None)
        s = s[0] if isinstance(s, (list, tuple)) else s
        return int(s) * self.vae_scale if isinstance(s, int) and s > 0 else None

    def resolution_note(self, resolution: int) -> str | None:
        """A one-line note when ``resolution`` is not the model's own size (e.g. SDXL at 512 px)."""
        n = self.native_resolution
        if n is None or int(resolution) == n:
            return None
        name = os.path.basename(os.path.normpath(self.source)) or self.source
        return (f"note: {name} makes {n} px images natively; --resolution {resolution} works at "
                f"{resolution} px (--resolution {n} uses the model's own size)")

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        return (batch, self.unet.config.in_channels, height // f, width // f)

    @staticmethod
    def _ids(tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([B, 77, D], pooled [B, P] or None)`` as diffusers' pipelines encode prompts."""
        if self.text_encoder_2 is None:
            out = self.text_encoder(self._ids(self.tokenizer, prompts).to(self.device), return_dict=True)
            return out.last_hidden_state.float(), None
        parts = []
        for tok, te in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = te(self._ids(tok, prompts).to(self.device), output_hidden_states=True, return_dict=True)
            parts.append(out.hidden_states[-2].float())
        return torch.cat(parts, dim=-1), out.text_embeds.float()

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Cached per prompt: a training run sees each prompt many times."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            crossattn, pooled = self._encode(missing)
            for i, p in enumerate(missing):
                self._cache[p] = (crossattn[i], None if pooled is None else pooled[i])
            if len(self._cache) > 20000:
                self._cache = {p: self._cache[p] for p in missing}
        rows = [self._cache[p] for p in prompts]
        pooled = torch.stack([r[1] for r in rows]) if rows and rows[0][1] is not None else None
        return Cond(torch.stack([r[0] for r in rows]), pooled)

    @property
    def pooled_dim(self) -> int | None:
        """Size of the pooled vector the UNet reads (SDXL: 1280), or None."""
        if self.text_encoder_2 is None:
            return None
        return int(self.text_encoder_2.config.projection_dim)

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``E("")`` and, for SDXL, its pooled vector: what the UIs use as an empty negative
        (diffusers' SDXL pipeline uses zeros only when no negative prompt is given at all)."""
        null, pooled = self._empty()
        return null.clone(), None if pooled is None else pooled.clone()

    def _empty(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``E("")`` and its pooled vector, encoded once (read-only: callers copy what they change)."""
        if self._null is None:
            self._null = self._encode([""])
        return self._null

    def negative_cond(self, neg: torch.Tensor, pooled: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None) -> Cond:
        """A negative's Cond; SDXL's pooled vector is the empty prompt's unless one is given.
        ``mask`` is for the T5 families (:mod:`reneg.backends.pixart`); CLIP families read every row."""
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError(f"{self.family} reads every row of a negative; an attention mask with padding "
                             f"belongs to a T5 (PixArt) negative")
        if self.text_encoder_2 is None:
            return Cond(neg.to(self.device))
        if pooled is None:  # no copy: called on every training step, and the cond is only read
            pooled = self._empty()[1]
        return Cond(neg.to(self.device), pooled.reshape(1, -1).to(self.device))

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        z = x0 / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            z = z + vae.config.shift_factor
        img = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return img.to(torch.promote_types(img.dtype, torch.float32)).clamp(-1, 1)

    def to(self, device) -> "DiffusersBackend":
        self.device = torch.device(device)
        for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if m is not None:
                m.to(self.device)
        self._cache.clear()
        self._null = None
        return self

    def set_performance(self, *, sdpa: bool | None = None, checkpointing: bool | None = None,
                        channels_last: bool | None = None, compile: bool = False) -> "DiffusersBackend":
        """Speed and memory switches (the README's Performance section); none changes the maths.

        ``sdpa``: PyTorch's fused scaled_dot_product_attention in the UNet and VAE
        (False: the plain softmax(QK^T)V processor, the benchmarks' reference).
        ``checkpointing``: recompute UNet and VAE-decoder activations during backward.
        ``channels_last``: NHWC convolution weights (pays with bf16/fp16 on recent GPUs).
        ``compile``: ``torch.compile`` the UNet in place. ``None`` leaves a switch as it is.
        """
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        for m in (self.unet, self.vae):
            if sdpa is not None:
                m.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())
            if checkpointing and getattr(m, "_supports_gradient_checkpointing", False):
                m.enable_gradient_checkpointing()
            elif checkpointing is not None and getattr(m, "_supports_gradient_checkpointing", False):
                m.disable_gradient_checkpointing()
            if channels_last is not None:
                m.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if compile:
            self.unet.compile()
        return self


def _family_of(text_encoder, unet, source: str, text_encoder_2=None) -> str:
    xattn = unet.config.cross_attention_dim
    xattn = xattn[0] if isinstance(xattn, (list, tuple)) else xattn
    text_time = getattr(unet.config, "addition_embed_type", None) == "text_time"
    if text_encoder_2 is None:
        hidden = int(getattr(text_encoder.config, "hidden_size", 0))
        if text_time:
            raise ModelLoadError(f"{source}: the UNet reads a pooled vector and size conditioning (SDXL), "
                                 f"but there is no text_encoder_2/ (an SDXL folder has text_encoder/, "
                                 f"text_encoder_2/, tokenizer/ and tokenizer_2/)")
        if hidden != xattn:
            raise ModelLoadError(f"{source}: text encoder hidden size {hidden} does not match the UNet's "
                                 f"cross_attention_dim {xattn}")
        fam = family_for_hidden(hidden)
        if fam is None or fam.name in ("sdxl", "pixart"):
            raise ModelLoadError(f"{source}: text encoder hidden size {hidden} is not an SD1.x (768), "
                                 f"SD2.x (1024) or demo (64) model")
        return fam.name
    h1 = int(getattr(text_encoder.config, "hidden_size", 0))
    h2 = int(getattr(text_encoder_2.config, "hidden_size", 0))
    if not text_time:
        raise ModelLoadError(f"{source}: has text_encoder_2/ but its UNet does not read SDXL's pooled vector "
                             f"and size conditioning (addition_embed_type is "
                             f"{getattr(unet.config, 'addition_embed_type', None)!r}, expected 'text_time')")
    if h1 + h2 != xattn:
        raise ModelLoadError(f"{source}: the two text encoders' hidden sizes {h1} + {h2} do not add up to the "
                             f"UNet's cross_attention_dim {xattn}")
    pooled = int(getattr(text_encoder_2.config, "projection_dim", 0))
    add = getattr(getattr(unet, "add_embedding", None), "linear_1", None)
    want = pooled + 6 * int(getattr(unet.config, "addition_time_embed_dim", 0) or 0)
    if add is not None and add.in_features != want:
        raise ModelLoadError(f"{source}: the UNet's added embedding reads {add.in_features} numbers, but the "
                             f"pooled vector ({pooled}) and six size numbers give {want} (an SDXL refiner, "
                             f"which reads an aesthetic score, is not supported)")
    fam = family_for_hidden(xattn)
    if fam is None or fam.name != "sdxl" or fam.pooled != pooled:
        raise ModelLoadError(f"{source}: a two-encoder model with cross_attention_dim {xattn} and a pooled "
                             f"vector of {pooled} is not SDXL (2048 and 1280)")
    return fam.name


def load_diffusers(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   config: str | None = None) -> DiffusersBackend:
    """Load SD1.x / SD2.x / SDXL from a diffusers folder or a single-file checkpoint, locally."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_folder(path, device, dtype)
    if os.path.isfile(path):
        return _load_single_file(path, device, dtype, config)
    raise ModelLoadError(f"{path}: no such model folder or file (give a local diffusers folder "
                         f"with model_index.json, or a .safetensors checkpoint)")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not a readable JSON config ({e})") from None


def _is_sdxl_folder(path: str, index: dict | None = None) -> bool:
    """A two-encoder (SDXL) folder: its model_index.json (read here unless given) or its folders say so."""
    if index is None:
        p = os.path.join(path, "model_index.json")
        index = _read_json(p) if os.path.isfile(p) else {}
    return "text_encoder_2" in index or os.path.isdir(os.path.join(path, "text_encoder_2"))


def _load_folder(path: str, device, dtype) -> DiffusersBackend:
    from . import pixart  # PixArt-alpha / -sigma folders: T5, a transformer, attention masks

    if pixart.is_pixart_folder(path):
        return pixart.load_folder(path, device, dtype)
    sdxl = _is_sdxl_folder(path)
    need = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
            "scheduler/scheduler_config.json"]
    if sdxl:
        need += ["text_encoder_2/config.json", "tokenizer_2"]
    missing = [n for n in need if not os.path.exists(os.path.join(path, n))]
    if missing:
        kind = "Stable Diffusion XL" if sdxl else "Stable Diffusion"
        raise ModelLoadError(f"{path}: not a complete diffusers {kind} folder; missing {', '.join(missing)}")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = dict(local_files_only=True, torch_dtype=dtype)
    te2 = tok2 = None
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        if sdxl:
            te2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw)
            tok2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(f"{path}: could not load the model: {str(e)[:400]}") from None
    sched = _read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    return _assemble(unet, vae, text_encoder, tokenizer, sched, path, device, dtype, te2, tok2)


def _assemble(unet, vae, text_encoder, tokenizer, sched, source, device, dtype,
              text_encoder_2=None, tokenizer_2=None) -> DiffusersBackend:
    family = _family_of(text_encoder, unet, source, text_encoder_2)
    for m in (unet, vae, text_encoder, text_encoder_2):
        if m is not None:
            m.requires_grad_(False).eval()
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)  # SDXL's VAE overflows in float16, as diffusers' pipeline knows
    backend = DiffusersBackend(unet, vae, text_encoder, tokenizer, dict(sched), family, source,
                               torch.device(device), dtype, text_encoder_2, tokenizer_2)
    return backend.to(device)


def _load_single_file(path: str, device, dtype, config: str | None) -> DiffusersBackend:
    if not path.endswith((".safetensors", ".ckpt")):
        raise ModelLoadError(f"{path}: expected a .safetensors checkpoint or a diffusers folder")
    if path.endswith(".ckpt"):
        raise ModelLoadError(f"{path}: .ckpt checkpoints are pickles; convert it to .safetensors first")
    if not config or not os.path.isfile(os.path.join(config, "model_index.json")):
        raise ModelLoadError(
            f"{path}: a single-file checkpoint needs its architecture's configs, and ReNeg never "
            f"downloads them. Pass --config FOLDER, a local diffusers folder of the same model type "
            f"(e.g. stable-diffusion-v1-5 with model_index.json, unet/config.json, vae/config.json, "
            f"text_encoder/config.json, tokenizer/ and scheduler/scheduler_config.json, or "
            f"stable-diffusion-xl-base-1.0 with text_encoder_2/ and tokenizer_2/ as well; the weights "
            f"in it are not needed)")
    index = _read_json(os.path.join(config, "model_index.json"))
    sdxl = _is_sdxl_folder(config, index)
    parts = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] + (["text_encoder_2", "tokenizer_2"] if sdxl else [])
    unlisted = [n for n in parts if not isinstance(index.get(n), list) or None in index.get(n)]
    if unlisted:
        # diffusers builds the pipeline from this list; a short one fails deep inside it with a TypeError
        raise ModelLoadError(f"{path}: the config folder {config} has a model_index.json that does not list "
                             f"{', '.join(unlisted)} (expected entries such as \"unet\": [\"diffusers\", "
                             f"\"UNet2DConditionModel\"], as in the model's own diffusers folder)")
    missing = [n for n in parts if not os.path.exists(os.path.join(config, n))]
    if missing:
        raise ModelLoadError(f"{path}: the config folder {config} has no {', '.join(n + '/' for n in missing)}")
    try:
        if sdxl:
            from diffusers import StableDiffusionXLPipeline

            pipe = StableDiffusionXLPipeline.from_single_file(
                path, config=config, local_files_only=True, torch_dtype=dtype)
        else:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_single_file(
                path, config=config, local_files_only=True, torch_dtype=dtype,
                safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise ModelLoadError(f"{path}: could not load this checkpoint with the configs in {config}: "
                             f"{str(e)[:400]}") from None
    return _assemble(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, dict(pipe.scheduler.config),
                     path, device, dtype, getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None))
