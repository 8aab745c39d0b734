"""Chroma through diffusers: a flow-matching, Flux-shaped transformer read by T5-XXL with a mask.

A diffusers Chroma folder (``model_index.json`` naming ``ChromaPipeline``, with ``transformer/`` (a
``ChromaTransformer2DModel``), ``vae/``, ``text_encoder/`` (a T5 encoder), ``tokenizer/`` and
``scheduler/`` (``FlowMatchEulerDiscreteScheduler``)) loads into :class:`ChromaBackend`. What differs
from Stable Diffusion is done as ``ChromaPipeline`` does it:

- **Text**: T5 v1.1 XXL, prompts padded to 512 tokens and encoded *with* the attention mask; the
  transformer reads the text's tokens (its ``</s>`` included) and the first padding token, and no
  other padding. Rows the model does not read are stored as zeros, so a negative's rows imply its
  mask (:func:`reneg.embedding.implied_attention_mask`), which is how the trainer passes it.
- **Mask semantics**: the mask is applied as a boolean mask (a masked row is invisible), as Chroma's
  own trainer and ComfyUI (which passes no padding rows at all) use the model. diffusers 0.42's
  pipeline turns the masks it makes itself into float 0/1 tensors, which attention adds to its
  logits instead of masking; given boolean masks (``prompt_attention_mask`` /
  ``negative_prompt_attention_mask``) it masks, and then it is what this backend computes.
- **Denoiser**: latents are the VAE's ``[B, 16, H/8, W/8]``, packed to 2 x 2 patches for the
  transformer (64 channels) with Flux's image position ids; text ids are zero. The transformer
  predicts the flow velocity ``v = eps - x0`` at flow time t, so ``x0 = x - t v`` and the sampler's
  step is the Euler step (``flow = True``, :mod:`reneg.sampling`). Trailing text rows that no sample
  of a batch reads are dropped before the call: the output is the same, and the sequence shorter.
- **Schedule**: ``FlowMatchEulerDiscreteScheduler`` from the folder's config with the pipeline's
  sigmas (``linspace(1, 1/N, N)``) and its time shift; with ``use_dynamic_shifting`` the shift
  ``mu`` is the pipeline's at the model's native 1024 px (4096 image tokens, ``mu = max_shift``),
  which is also the shift ComfyUI samples Chroma with at any size.
"""

from __future__ import annotations

import os

import torch

from ..cond import Cond
from ..embedding import implied_attention_mask
from ..families import get_family
from .diffusers_backend import DiffusersBackend, ModelLoadError, module_device
from .patches import image_ids
from .patches import pack as pack_latents
from .patches import unpack as unpack_latents
from .parts import T5_FOLDER_PARTS, load_parts, load_t5_tokenizer, read_json, require_parts

PIPELINE = get_family("chroma").pipeline


def chroma_mask(tokenizer_mask: torch.Tensor, reads_padding: int = 1) -> torch.Tensor:
    """The transformer's text mask from the tokenizer's: the text's tokens and the first
    ``reads_padding`` padding tokens (``ChromaPipeline._get_t5_prompt_embeds``), ``[B, L]`` int64."""
    lengths = tokenizer_mask.sum(dim=1, keepdim=True)
    idx = torch.arange(tokenizer_mask.shape[1], device=tokenizer_mask.device)[None]
    return (idx < lengths + reads_padding).long()


class ChromaDenoiser:
    """``D(x, t, cond) -> x0`` around a ``ChromaTransformer2DModel`` (flow matching, ``x0 = x - t v``)."""

    def __init__(self, transformer):
        self.unet = transformer  # the name the shared code (devices, checkpointing) knows
        self._ids: tuple | None = None

    @property
    def transformer(self):
        return self.unet

    def _image_ids(self, h: int, w: int, device, dtype) -> torch.Tensor:
        key = (h, w, device, dtype)
        if self._ids is None or self._ids[0] != key:
            self._ids = (key, image_ids(h, w, device, dtype))
        return self._ids[1]

    @staticmethod
    def _trim(cond: Cond) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows up to the last one any sample reads, and their mask (None when every row counts)."""
        rows, mask = cond.crossattn, cond.mask
        if mask is None:
            return rows, None
        read = mask.bool()
        cols = read.any(dim=0).nonzero()
        keep = int(cols[-1]) + 1 if len(cols) else 1
        rows, read = rows[:, :keep], read[:, :keep]
        return rows, (None if bool(read.all()) else read)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        tr = self.unet
        if torch.is_grad_enabled() and getattr(tr, "gradient_checkpointing", False) and x.shape[0] > 1:
            rows, mask = self._trim(cond)
            if mask is not None:
                # diffusers' checkpointed single-stream blocks drop the attention mask: one sample
                # at a time, each cut to its own rows, needs none
                return torch.cat(
                    [self(x[i : i + 1], sigma[i : i + 1], cond.index(slice(i, i + 1))) for i in range(x.shape[0])]
                )
        b, _, h, w = x.shape
        dt = tr.dtype
        rows, mask = self._trim(cond)
        img = pack_latents(x).to(dt)
        ids = self._image_ids(h, w, x.device, dt)
        attn = None
        if mask is not None:
            attn = torch.cat([mask, mask.new_ones(b, img.shape[1])], dim=1)
        v = tr(
            hidden_states=img,
            timestep=sigma.to(dt).expand(b),
            encoder_hidden_states=rows.to(dt),
            txt_ids=torch.zeros(rows.shape[1], 3, device=x.device, dtype=dt),
            img_ids=ids,
            attention_mask=attn,
            return_dict=False,
        )[0]
        v = unpack_latents(v, h, w).to(x.dtype)
        t = sigma.to(x.dtype).view(-1, 1, 1, 1)
        return x - t * v


# the scheduler config Chroma's releases ship (FlowMatchEulerDiscreteScheduler, dynamic shift), for files that
# carry none (ComfyUI's single files)
SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}


class ChromaBackend(DiffusersBackend):
    """A Chroma transformer + VAE + T5 encoder; ``unet`` holds the transformer, so the shared code
    (decode, device moves, gradient checkpointing) applies unchanged."""

    flow = True

    def __post_init__(self):
        self._denoiser = ChromaDenoiser(self.unet)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._null = None
        spec = get_family(self.family)
        self.max_tokens = spec.tokens
        self.reads_padding = spec.reads_padding

    @property
    def transformer(self):
        return self.unet

    @property
    def prediction_type(self) -> str:
        return "flow"

    def set_prediction_type(self, prediction_type: str, reason: str = "") -> None:
        raise ModelLoadError(f"{self.source}: Chroma is a flow-matching model; --prediction-type does not apply")

    @property
    def native_resolution(self) -> int:
        return get_family(self.family).native_resolution

    def describe(self) -> str:
        name = os.path.basename(os.path.normpath(self.source)) or self.source
        return f"{name}: chroma ({self.model_info.get('kind', 'diffusers folder')}), flow matching, its own VAE"

    # --- schedule ---------------------------------------------------------------------------
    def image_tokens(self, height: int, width: int) -> int:
        """Packed image tokens of an image of ``height`` x ``width`` px (2 x 2 patches of the latent)."""
        f = self.vae_scale * 2
        return (height // f) * (width // f)

    def shift_mu(self, tokens: int | None = None) -> float:
        """The pipeline's ``mu`` (``calculate_shift``) for ``tokens`` image tokens; by default for the
        scheduler's ``max_image_seq_len`` (4096: Chroma's native 1024 px), where ``mu`` is ``max_shift``,
        the shift ComfyUI samples Chroma with whatever the size."""
        c = self.scheduler_config
        b0, b1 = int(c.get("base_image_seq_len", 256)), int(c.get("max_image_seq_len", 4096))
        s0, s1 = float(c.get("base_shift", 0.5)), float(c.get("max_shift", 1.15))
        tokens = b1 if tokens is None else tokens
        m = (s1 - s0) / (b1 - b0)
        return tokens * m + (s0 - m * b0)

    def schedule(self, steps: int, tokens: int | None = None) -> torch.Tensor:
        """Flow times ``[steps + 1]`` from 1 to 0: the folder's ``FlowMatchEulerDiscreteScheduler``
        set as ``ChromaPipeline`` sets it (``tokens``: the image tokens its shift is for)."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        sigmas = [1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1) for i in range(steps)]
        sched.set_timesteps(sigmas=np.array(sigmas, dtype=np.float32), mu=self.shift_mu(tokens))
        return sched.sigmas.double()

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale * 2  # the VAE's factor, then 2 x 2 packing
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for Chroma, got {height}x{width}")
        return (batch, self.unet.config.in_channels // 4, height // self.vae_scale, width // self.vae_scale)

    # --- text ---------------------------------------------------------------------------------
    @property
    def pooled_dim(self) -> None:
        return None

    @torch.no_grad()
    def _encode_masked(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, 512, 4096], mask [B, 512])`` as ``ChromaPipeline`` encodes prompts: padded to 512
        tokens, T5 run with the tokenizer's mask, the transformer's mask one padding token longer.
        Rows past the mask are zeros (the model never reads them)."""
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_tokens,
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        te = self.text_encoder
        dev = module_device(te)  # the CPU after offload_text_encoder(); the result on self.device
        out = te(tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev))[0].float().to(self.device)
        mask = chroma_mask(tok.attention_mask.to(self.device), self.reads_padding)
        return out * mask[..., None], mask

    def encode_prompts(self, prompts: list[str]) -> Cond:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        for p in missing:  # one at a time: an encoding never depends on the prompts beside it
            rows, mask = self._encode_masked([p])
            self._cache[p] = self._keep((rows[0], mask[0]))
        self._trim_cache(prompts)
        got = [self._use(self._cache[p]) for p in prompts]
        return Cond(torch.stack([r[0] for r in got]), mask=torch.stack([r[1] for r in got]))

    def _empty(self):
        if self._null is None:
            self._null = self._encode_masked([""])
        return self._null

    def null_embedding(self) -> tuple[torch.Tensor, None]:
        """``E("")``: ``</s>``, the first padding row, then zeros; its mask ``[1, 1, 0, ..., 0]``
        is what the rows imply."""
        return self._empty()[0].clone(), None

    def null_mask(self) -> torch.Tensor:
        return self._empty()[1].clone()

    def negative_mask(self, neg: torch.Tensor) -> torch.Tensor:
        return implied_attention_mask(neg.detach(), self.reads_padding).to(self.device)

    def negative_cond(
        self, neg: torch.Tensor, pooled: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> Cond:
        """A negative keeps its rows (at most 512) and carries its mask (by default the one its rows imply)."""
        if pooled is not None:
            raise ValueError("Chroma reads no pooled vector; a pooled vector was given with the negative")
        if neg.dim() != 3 or neg.shape[0] != 1:
            raise ValueError(f"a negative must be [1, tokens, hidden], got {list(neg.shape)}")
        if neg.shape[1] > self.max_tokens:
            raise ValueError(f"Chroma reads at most {self.max_tokens} text rows; the negative has {neg.shape[1]}")
        m = self.negative_mask(neg) if mask is None else mask.reshape(1, -1).long().to(self.device)
        if m.shape[1] != neg.shape[1]:
            raise ValueError(f"the attention mask covers {m.shape[1]} rows, the negative has {neg.shape[1]}")
        return Cond(neg.to(self.device), mask=m)

    def set_performance(self, *, sdpa=None, checkpointing=None, channels_last=None, compile=False):
        """The transformer always runs PyTorch's SDPA; ``checkpointing`` and ``compile`` apply to it,
        the others to the VAE as for Stable Diffusion."""
        if checkpointing is not None:
            for m in (self.unet, self.vae):
                (m.enable_gradient_checkpointing if checkpointing else m.disable_gradient_checkpointing)()
        if sdpa is not None or channels_last is not None:
            from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

            if sdpa is not None:
                self.vae.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())
            if channels_last is not None:
                self.vae.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if compile:
            self.unet.compile()
        return self


def is_chroma_folder(path: str, index: dict | None = None) -> bool:
    if index is None:
        p = os.path.join(path, "model_index.json")
        index = read_json(p) if os.path.isfile(p) else {}
    return str(index.get("_class_name", "")) == PIPELINE


def load_folder(path: str, device="cpu", dtype: torch.dtype = torch.float32) -> ChromaBackend:
    """Load a diffusers ``ChromaPipeline`` folder from local files only."""
    index = read_json(os.path.join(path, "model_index.json"))
    if not is_chroma_folder(path, index):
        raise ModelLoadError(f"{path}: model_index.json names {index.get('_class_name')!r}, not {PIPELINE}")
    require_parts(path, PIPELINE, T5_FOLDER_PARTS)
    from diffusers import AutoencoderKL, ChromaTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    m = load_parts(
        path, dtype, {"transformer": ChromaTransformer2DModel, "vae": AutoencoderKL, "text_encoder": T5EncoderModel}
    )
    transformer, vae, text_encoder = m["transformer"], m["vae"], m["text_encoder"]
    tokenizer = load_t5_tokenizer(os.path.join(path, "tokenizer"), AutoTokenizer)
    check_parts(transformer, vae, text_encoder, path)
    sched = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    for m in (transformer, vae, text_encoder):
        m.requires_grad_(False).eval()
    backend = ChromaBackend(
        transformer, vae, text_encoder, tokenizer, dict(sched), "chroma", path, torch.device(device), dtype
    )
    backend.model_info = {"source": path, "kind": "diffusers folder", "family": "chroma", "vae": "inside"}
    return backend.to(device)


def check_parts(transformer, vae, text_encoder, source: str) -> None:
    """One-line errors where a transformer, VAE and T5 encoder do not fit one Chroma model."""
    spec = get_family("chroma")
    d_model = int(getattr(text_encoder.config, "d_model", 0))
    joint = int(transformer.config.joint_attention_dim)
    if d_model != joint:
        raise ModelLoadError(
            f"{source}: the T5 encoder's width {d_model} does not match the transformer's joint_attention_dim {joint}"
        )
    if d_model != spec.hidden:
        raise ModelLoadError(
            f"{source}: Chroma reads T5-XXL rows of width {spec.hidden}; this text encoder is {d_model} wide"
        )
    latent = int(vae.config.latent_channels)
    if int(transformer.config.in_channels) != 4 * latent:
        raise ModelLoadError(
            f"{source}: the transformer reads {transformer.config.in_channels} channels, but 2 x 2 patches of the "
            f"VAE's {latent} latent channels are {4 * latent}"
        )
