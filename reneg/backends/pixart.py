"""PixArt-alpha and PixArt-sigma through diffusers: the T5 family's backend.

A diffusers PixArt folder (``model_index.json`` naming ``PixArtAlphaPipeline`` or
``PixArtSigmaPipeline``, with ``transformer/``, ``vae/``, ``text_encoder/`` (a T5 encoder),
``tokenizer/`` and ``scheduler/``) loads into :class:`PixArtBackend`, which offers the same operations
as :class:`reneg.backends.diffusers_backend.DiffusersBackend`; what differs from Stable Diffusion is
done as diffusers' PixArt pipelines do it.
"""

from __future__ import annotations

import os

import torch

from ..cond import Cond
from ..embedding import implied_attention_mask
from ..families import FAMILIES, get_family
from ..sampling import ddim_schedule
from .diffusers_backend import DiffusersBackend, DiffusersDenoiser, ModelLoadError, module_device
from .parts import T5_FOLDER_PARTS, load_parts, load_t5_tokenizer, read_json, require_parts

# the pipelines of the T5 families this module loads, from the family table: {class name: family}
PIPELINES = {f.pipeline: f.name for f in FAMILIES.values() if f.pipeline.startswith("PixArt") and f.masked}


def pixart_family(index: dict) -> str | None:
    """The family a ``model_index.json`` names, or None when it is not a PixArt pipeline."""
    return PIPELINES.get(str(index.get("_class_name", "")))


class PixArtDenoiser(DiffusersDenoiser):
    """``D(x, sigma, cond) -> x0`` around a ``PixArtTransformer2DModel``.

    The transformer reads the prompt's rows and their attention mask (``Cond.mask``), so padding rows
    are ignored. It predicts noise and a learned variance (8 output channels for 4 latent channels):
    only the first half, the noise, feeds the sampler. ``prediction_type`` epsilon and v_prediction are
    both handled."""

    def __init__(self, transformer, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", vae_scale: int = 8):
        super().__init__(transformer, alphas_cumprod, prediction_type, vae_scale)
        self.text_time = False
        self.size_cond = bool(getattr(transformer, "use_additional_conditions", False))
        self._size: tuple | None = None

    @property
    def transformer(self):
        return self.unet

    def added_cond(self, x: torch.Tensor, cond: Cond) -> dict:
        """``resolution`` ``[B, 2]`` (height, width in pixels) and ``aspect_ratio`` ``[B, 1]``
        for a transformer that reads them (PixArt-alpha at 1024 px, ``use_additional_conditions``);
        ``cond.extra`` may give its own. Both are derived from the latent, as the pipeline does (after
        its resolution binning, the size of the latent is the size it passes)."""
        if not self.size_cond:
            return {"resolution": None, "aspect_ratio": None}
        dt = self.unet.dtype
        b = x.shape[0]
        h, w = x.shape[-2] * self.vae_scale, x.shape[-1] * self.vae_scale
        key = (h, w, x.device, dt)
        if self._size is None or self._size[0] != key:
            self._size = (
                key,
                torch.tensor([[h, w]], dtype=dt, device=x.device),
                torch.tensor([[h / w]], dtype=dt, device=x.device),
            )
        res = cond.extra.get("resolution")
        ar = cond.extra.get("aspect_ratio")
        res = self._size[1].expand(b, 2) if res is None else res.to(dt)
        ar = self._size[2].expand(b, 1) if ar is None else ar.to(dt)
        return {"resolution": res, "aspect_ratio": ar}

    def nag_kwargs(self, cond: Cond) -> dict:
        """As a UNet's, with the negative's T5 rows through the transformer's caption projection, which the
        transformer applies to the prompt's rows before its cross-attention reads them."""
        kw = super().nag_kwargs(cond)
        if kw:
            ctx = kw["cross_attention_kwargs"]["nag"]
            ctx.negative = self.unet.caption_projection(ctx.negative)
        return kw

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        s = sigma.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        c_in = 1 / (1 + s * s).sqrt()
        dt = self.unet.dtype
        mask = cond.mask.to(dt) if cond.mask is not None else None
        out = self.unet(
            (x * c_in).to(dt),
            encoder_hidden_states=cond.crossattn.to(dt),
            encoder_attention_mask=mask,
            timestep=self.timestep(sigma).to(dt),
            added_cond_kwargs=self.added_cond(x, cond),
            return_dict=False,
            **self.nag_kwargs(cond),
        )[0]
        c = x.shape[1]
        if out.shape[1] == 2 * c:  # learned sigma: noise first, variance second
            out = out[:, :c]
        out = out.to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - s * out
        return x * c_in * c_in - s * c_in * out


class PixArtBackend(DiffusersBackend):
    """A PixArt transformer + VAE + T5 encoder; ``unet`` holds the transformer, so the
    shared code (latent shape, decode, device moves, speed switches) applies unchanged."""

    def __post_init__(self):
        ac = self.alphas_cumprod()
        self._denoiser = PixArtDenoiser(
            self.unet, ac, self.scheduler_config.get("prediction_type", "epsilon"), self.vae_scale
        )
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._null = None
        self.max_tokens = get_family(self.family).tokens

    @property
    def transformer(self):
        return self.unet

    def schedule(self, steps: int) -> torch.Tensor:
        """The DDIM schedule of ``DDIMScheduler.from_config(<the folder's scheduler config>)``, with
        DDIMScheduler's own defaults for what a PixArt config (a DPM-Solver one) leaves out
        (``set_alpha_to_one=True``, ``steps_offset=0``). DDIMScheduler's default ``clip_sample=True``
        clips latents to [-1, 1]; the sampler here never clips (PixArt's own DPM-Solver does not either)."""
        c = self.scheduler_config
        return ddim_schedule(
            self.alphas_cumprod(),
            steps,
            int(c.get("steps_offset", 0)),
            c.get("timestep_spacing", "leading"),
            bool(c.get("set_alpha_to_one", True)),
        )

    @property
    def pooled_dim(self) -> None:
        return None

    @torch.no_grad()
    def _encode_masked(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, L, 4096], mask [B, L])`` as diffusers' PixArt pipelines encode prompts
        (no caption cleaning: ``clean_caption=False``): tokenized to a fixed length, 120 tokens (alpha)
        or 300 (sigma), padded, and encoded by the T5 encoder *with* the attention mask."""
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_tokens,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        dev = module_device(self.text_encoder)  # the CPU after offload_text_encoder(); results on self.device
        out = self.text_encoder(tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev))[0]
        return out.float().to(self.device), tok.attention_mask.long().to(self.device)

    def encode_prompts(self, prompts: list[str]) -> Cond:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            rows, mask = self._encode_masked(missing)
            for i, p in enumerate(missing):
                self._cache[p] = self._keep((rows[i], mask[i]))
        self._trim_cache(prompts)
        got = [self._use(self._cache[p]) for p in prompts]
        return Cond(torch.stack([r[0] for r in got]), mask=torch.stack([r[1] for r in got]))

    def _empty(self):
        if self._null is None:
            rows, mask = self._encode_masked([""])
            self._null = (rows, mask)
        return self._null

    def null_embedding(self) -> tuple[torch.Tensor, None]:
        """``E("")``: all the model's rows (the end token, then padding); its mask is
        the empty prompt's, ``[1, 0, ..., 0]``, which :meth:`negative_cond` implies."""
        return self._empty()[0].clone(), None

    def null_mask(self) -> torch.Tensor:
        return self._empty()[1].clone()

    def negative_mask(self, neg: torch.Tensor) -> torch.Tensor:
        """The mask a negative's rows are used with when none is given (see
        :func:`reneg.embedding.implied_attention_mask`)."""
        return implied_attention_mask(neg.detach()).to(self.device)

    def negative_cond(
        self, neg: torch.Tensor, pooled: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> Cond:
        """A negative keeps all its rows and carries its own mask (by default :meth:`negative_mask`)."""
        if pooled is not None:
            raise ValueError(f"{self.family} reads no pooled vector; a pooled vector was given with the negative")
        if neg.dim() != 3 or neg.shape[0] != 1:
            raise ValueError(f"a negative must be [1, tokens, hidden], got {list(neg.shape)}")
        if neg.shape[1] > self.max_tokens:
            raise ValueError(
                f"this {self.family} model reads at most {self.max_tokens} text rows; the negative has {neg.shape[1]}"
            )
        m = self.negative_mask(neg) if mask is None else mask.reshape(1, -1).long().to(self.device)
        if m.shape[1] != neg.shape[1]:
            raise ValueError(f"the attention mask covers {m.shape[1]} rows, the negative has {neg.shape[1]}")
        return Cond(neg.to(self.device), mask=m)

    def to(self, device) -> "PixArtBackend":
        super().to(device)
        return self


def is_pixart_folder(path: str) -> bool:
    p = os.path.join(path, "model_index.json")
    return os.path.isfile(p) and pixart_family(read_json(p)) is not None


# the packages transformers reads a SentencePiece model (``spiece.model``) with; ``tokenizer.json``
# needs only ``tokenizers``, which transformers always brings
def load_folder(path: str, device="cpu", dtype: torch.dtype = torch.float32) -> PixArtBackend:
    """Load a diffusers PixArt-alpha / PixArt-sigma folder from local files only."""
    index = read_json(os.path.join(path, "model_index.json"))
    family = pixart_family(index)
    if family is None:
        raise ModelLoadError(
            f"{path}: model_index.json names {index.get('_class_name')!r}, not {' or '.join(PIPELINES)}"
        )
    require_parts(path, index["_class_name"], T5_FOLDER_PARTS)
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    m = load_parts(
        path, dtype, {"transformer": PixArtTransformer2DModel, "vae": AutoencoderKL, "text_encoder": T5EncoderModel}
    )
    transformer, vae, text_encoder = m["transformer"], m["vae"], m["text_encoder"]
    tokenizer = load_t5_tokenizer(os.path.join(path, "tokenizer"), AutoTokenizer)
    spec = get_family(family)
    d_model = int(getattr(text_encoder.config, "d_model", 0))
    caption = transformer.config.caption_channels
    if caption is not None and int(caption) != d_model:
        raise ModelLoadError(
            f"{path}: the T5 encoder's width {d_model} does not match the transformer's caption_channels {caption}"
        )
    if d_model != spec.hidden:
        raise ModelLoadError(
            f"{path}: {spec.description} reads T5-XXL rows of width {spec.hidden}; this text encoder is {d_model} wide"
        )
    latent = transformer.config.in_channels
    if transformer.config.out_channels not in (latent, 2 * latent):
        raise ModelLoadError(
            f"{path}: the transformer outputs {transformer.config.out_channels} channels for "
            f"{latent} latent channels (expected {latent}, or {2 * latent} with a learned variance)"
        )
    sched = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    for m in (transformer, vae, text_encoder):
        m.requires_grad_(False).eval()
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)
    backend = PixArtBackend(
        transformer, vae, text_encoder, tokenizer, dict(sched), family, path, torch.device(device), dtype
    )
    return backend.to(device)
