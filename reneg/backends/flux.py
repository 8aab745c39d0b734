"""Flux.1 dev and schnell through diffusers: a flow-matching transformer read by T5 rows and a CLIP vector.

A diffusers Flux folder (``model_index.json`` naming ``FluxPipeline``, with ``transformer/``
(``FluxTransformer2DModel``), ``vae/``, ``text_encoder/`` (CLIP-L), ``tokenizer/``, ``text_encoder_2/``
(T5 v1.1 XXL), ``tokenizer_2/`` and ``scheduler/`` (``FlowMatchEulerDiscreteScheduler``)) loads into
:class:`FluxBackend`, which offers the operations of :class:`reneg.backends.base.Backend`, done as
diffusers' ``FluxPipeline`` does them:

- **Conditioning.** The prompt's T5 rows ``[B, L, 4096]`` (padded to ``L`` = 512 for dev, 256 for
  schnell with T5's pad token, encoded *without* an attention mask, so every row is read) in
  ``Cond.crossattn``, and CLIP-L's pooled output ``[B, 768]`` in ``Cond.pooled``. A negative is both: its
  rows and a pooled vector (the empty prompt's unless one is given, as for SDXL). The family tells
  dev from schnell by the transformer's guidance embedding (``guidance_embeds``).
- **Denoiser.** Flux is a rectified-flow model: ``x_t = (1 - t) x0 + t eps`` and the transformer
  predicts the velocity ``v = eps - x0``, so ``D(x, t, cond) = x - t v``. The sampler's latent is the
  unpacked ``[B, 16, H/8, W/8]`` one (what the VAE reads); :class:`FluxDenoiser` packs it into 2x2
  patches (``[B, HW/4, 64]``), builds the image and text position ids (``img_ids`` rows ``(0, i, j)``,
  ``txt_ids`` zeros), passes the flow time as the timestep (diffusers' ``timestep / 1000``) and, for dev,
  the distilled guidance scale (``guidance``, 3.5 by default) to the guidance embedding, and unpacks the
  prediction. The sampler's DDIM step in sigma space is exactly the flow-matching Euler step when sigma
  is the flow time; CFG on x0 equals ``true_cfg_scale`` on the velocity.
- **Schedule.** ``FlowMatchEulerDiscreteScheduler``'s: ``t = linspace(1, 1/N, N)``, shifted (dev:
  ``use_dynamic_shifting`` with ``mu`` from the number of latent patches, ``calculate_shift``;
  schnell: the static ``shift``, 1), then 0. The shift depends on the image size: :meth:`FluxBackend.schedule`
  takes it, or the size of the last :meth:`FluxBackend.latent_shape`, or the model's native 1024 px.
- **Decode.** ``z = x0 / scaling_factor + shift_factor`` through the VAE.

Normalized Attention Guidance (``cond.nag``): :class:`FluxNAGAttnProcessor`, the NAG authors' Flux
formulation (the negative's text stream beside the prompt's; the image tokens' joint-attention output
combined by :func:`reneg.nag.nag_combine`), in one transformer call.

Attention, for guidance that works inside it (NAG): the transformer's joint text-image attention is
``FluxAttention`` (``diffusers.models.transformers.transformer_flux``), in
``transformer.transformer_blocks[i].attn`` (double-stream: text and image projected separately, text
tokens first in the joint sequence, ``encoder_hidden_states`` passed) and
``transformer.single_transformer_blocks[i].attn`` (single-stream: one sequence, text rows first, the
first ``L`` tokens); each calls its ``processor``, a ``FluxAttnProcessor``
(``processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None)``).
:meth:`FluxBackend.attention_modules` lists them, so a wrapper can replace ``attn.processor`` (or
call ``transformer.set_attn_processor``) without knowing the layout.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..cond import Cond
from ..families import get_family
from ..nag import NAG, nag_combine
from .diffusers_backend import DiffusersBackend, ModelLoadError, module_device
from .patches import image_ids, pack, unpack
from .parts import T5_FOLDER_PARTS, load_parts, load_t5_tokenizer, read_json, require_parts

PIPELINE = "FluxPipeline"
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's guidance_scale default, and ComfyUI's for a Flux conditioning
NATIVE_RESOLUTION = 1024  # FluxPipeline's default image size (default_sample_size 128 x the VAE's 8)
# FlowMatchEulerDiscreteScheduler options the schedule below does not implement (none of Flux's releases sets them)
# the scheduler configs the Flux.1 releases ship (FlowMatchEulerDiscreteScheduler), for files that carry none
# (ComfyUI's single files): dev shifts its schedule with the image size (``use_dynamic_shifting``, ``mu`` from
# the number of 2x2 latent patches); schnell does not
SCHEDULERS = {
    variant: {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": shift,
        "use_dynamic_shifting": dynamic,
    }
    for variant, shift, dynamic in (("flux-dev", 3.0, True), ("flux-schnell", 1.0, False))
}
_UNSUPPORTED = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")


def is_flux_index(index: dict) -> bool:
    return str(index.get("_class_name", "")) == PIPELINE


def calculate_shift(seq_len: int, config: dict) -> float:
    """``mu`` for ``seq_len`` latent patches: linear from ``base_shift`` at ``base_image_seq_len`` to
    ``max_shift`` at ``max_image_seq_len`` (FluxPipeline's ``calculate_shift``)."""
    b0, b1 = int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096))
    s0, s1 = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
    m = (s1 - s0) / (b1 - b0)
    return seq_len * m + (s0 - m * b0)


def flow_schedule(config: dict, steps: int, seq_len: int) -> torch.Tensor:
    """Flow times ``[steps + 1]`` (float64, from 1 down to 0) as ``FlowMatchEulerDiscreteScheduler``
    sets them for FluxPipeline's ``sigmas = linspace(1, 1/steps, steps)``."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).float().double()
    if config.get("use_dynamic_shifting"):
        mu = calculate_shift(seq_len, config)
        if config.get("time_shift_type", "exponential") == "linear":
            t = mu / (mu + (1 / t - 1))
        else:
            t = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    else:
        shift = float(config.get("shift", 1.0))
        t = shift * t / (1 + (shift - 1) * t)
    return torch.cat([t.float().double(), torch.zeros(1, dtype=torch.float64)])


# --- Normalized Attention Guidance in the joint attention ---------------------------------------------------


@dataclass(frozen=True)
class FluxNagContext:
    """What a NAG call hands each ``FluxAttention`` (``joint_attention_kwargs["nag"]``): the settings, the
    image stream's batch ``B`` (the text stream has ``2B`` rows, the positive prompts then their negatives)
    and the text token count ``L`` (the front of each single-stream sequence)."""

    nag: NAG
    batch: int
    text_rows: int


def _heads(attn, x, to_q, to_k, to_v, norm_q, norm_k):
    if getattr(attn, "fused_projections", False):
        raise ValueError("NAG on Flux: fused QKV projections are not supported; unfuse them first")
    q, k, v = (m(x).unflatten(-1, (-1, attn.head_dim)) for m in (to_q, to_k, to_v))
    return norm_q(q), norm_k(k), v


def _attend(q, k, v, rotary) -> torch.Tensor:
    """Joint attention of ``[N, S, H, d]`` queries, keys and values with Flux's rotary embedding -> ``[N, S, H*d]``."""
    from diffusers.models.embeddings import apply_rotary_emb

    if rotary is not None:
        q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2, 3).to(q.dtype)


class FluxNAGAttnProcessor:
    """NAG in Flux's joint attention, as the NAG authors formulate it for Flux (their ``NAGFluxAttnProcessor2_0``
    with the L1 norm of :func:`reneg.nag.nag_combine`). A call without a :class:`FluxNagContext` goes to the
    wrapped processor unchanged.

    Under NAG the text stream has ``2B`` rows (positive, then negative) and the image stream ``B``:

    - double-stream block: the image's queries, keys and values are used beside each text, so the positive
      text and the image attend jointly (image output ``Z+``) and so do the negative text and the same image
      (``Z-``); the image output is NAG's combine of the two, both text outputs go on (the negative text stream
      runs beside the positive one);
    - single-stream block: the image stream has been repeated to ``2B`` rows (:func:`install_nag`), each row
      attends jointly with its own text, and the image tokens' output of both halves becomes the combine of
      the positive half (``Z+``) and the negative half (``Z-``).

    ``Z`` goes on through the block's output projection (``to_out``; a single-stream block's ``proj_out``)."""

    def __init__(self, base):
        self.base = base

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, nag=None
    ):
        if nag is None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError("NAG on Flux: an attention mask is not supported (Flux reads every text row)")
        b, s = nag.batch, nag.nag
        q, k, v = _heads(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        if encoder_hidden_states is not None:  # double-stream: image [B, N, D], text [2B, L, D]
            if encoder_hidden_states.shape[0] != 2 * b or hidden_states.shape[0] != b:
                raise ValueError(
                    f"NAG on Flux: a joint attention over {hidden_states.shape[0]} image rows and "
                    f"{encoder_hidden_states.shape[0]} text rows; expected {b} and {2 * b}"
                )
            cq, ck, cv = _heads(
                attn,
                encoder_hidden_states,
                attn.add_q_proj,
                attn.add_k_proj,
                attn.add_v_proj,
                attn.norm_added_q,
                attn.norm_added_k,
            )
            # text first, then the same image rows beside each text
            q, k, v = (torch.cat([c, t.repeat(2, 1, 1, 1)], dim=1) for c, t in ((cq, q), (ck, k), (cv, v)))
            out = _attend(q, k, v, image_rotary_emb)
            rows = encoder_hidden_states.shape[1]
            text, image = out[:, :rows], out[:, rows:]
            z = nag_combine(image[:b], image[b:], s.scale, s.tau, s.alpha)
            return attn.to_out[1](attn.to_out[0](z)), attn.to_add_out(text)
        # single-stream: [2B, L + N, D], text rows first
        out = _attend(q, k, v, image_rotary_emb)
        rows = nag.text_rows
        z = nag_combine(out[:b, rows:], out[b:, rows:], s.scale, s.tau, s.alpha)
        return torch.cat([out[:, :rows], z.repeat(2, 1, 1)], dim=1)


def _image_rows_of_emb(module, args, kwargs):
    """A double-stream block's image norm (``norm1``) reads the first ``B`` rows of a ``2B``-row embedding
    (the positive prompts'), as the authors' truncated AdaLayerNormZero; any other call is left alone."""
    x, emb = args[0], kwargs.get("emb")
    if emb is not None and emb.shape[0] == 2 * x.shape[0]:
        kwargs = {**kwargs, "emb": emb[: x.shape[0]]}
    return args, kwargs


def _repeat_image_stream(module, args, output):
    """After the last double-stream block: an image stream of ``B`` rows beside ``2B`` text rows is
    repeated to ``2B`` for the single-stream blocks (each half joined with its own text); else unchanged."""
    text, image = output
    if text.shape[0] == 2 * image.shape[0]:
        return text, image.repeat(2, 1, 1)
    return output


def install_nag(transformer) -> None:
    """Make a ``FluxTransformer2DModel`` able to run NAG: every attention processor is wrapped in
    :class:`FluxNAGAttnProcessor` (again after anything replaced them: a processor that does not read the
    NAG context would drop it with only a warning), and, once, two hooks (:func:`_image_rows_of_emb`,
    :func:`_repeat_image_stream`) that act only in NAG's batch layout (text rows twice the image rows), so
    a plain call runs exactly as before, including the recomputation of gradient checkpointing."""
    if not len(transformer.transformer_blocks):
        raise ValueError("NAG on Flux needs at least one double-stream block")
    procs = transformer.attn_processors
    if not all(isinstance(p, FluxNAGAttnProcessor) for p in procs.values()):
        transformer.set_attn_processor(
            {k: p if isinstance(p, FluxNAGAttnProcessor) else FluxNAGAttnProcessor(p) for k, p in procs.items()}
        )
    if getattr(transformer, "_reneg_nag_hooks", False):
        return
    for blk in transformer.transformer_blocks:
        blk.norm1.register_forward_pre_hook(_image_rows_of_emb, with_kwargs=True)
    transformer.transformer_blocks[-1].register_forward_hook(_repeat_image_stream)
    transformer._reneg_nag_hooks = True


class FluxDenoiser:
    """``D(x, t, cond) -> x0`` around a ``FluxTransformer2DModel`` (see the module's docstring).

    ``guidance`` is the distilled guidance scale a dev transformer reads (``cond.extra["guidance"]``,
    ``[B]``, overrides it per sample, as ComfyUI's Flux conditioning carries one); schnell reads none.

    A cond carrying a NAG negative (``cond.nag``, active settings) runs the transformer once in NAG's batch
    layout (:class:`FluxNAGAttnProcessor`): the text rows, pooled vectors, timesteps and guidance of the
    prompts and of their negatives side by side (``2B``), the image latent once (``B``)."""

    flow = True
    supports_nag = True

    def __init__(self, transformer, guidance: float = DEFAULT_GUIDANCE):
        self.transformer = transformer
        self.guidance = float(guidance)
        self.guidance_embeds = bool(getattr(transformer.config, "guidance_embeds", False))
        self._ids: tuple | None = None

    @property
    def unet(self):  # the name the shared code (performance switches, meters) looks for
        return self.transformer

    def _image_ids(self, h: int, w: int, device, dtype) -> torch.Tensor:
        key = (h, w, device, dtype)
        if self._ids is None or self._ids[0] != key:
            self._ids = (key, image_ids(h, w, device, dtype))
        return self._ids[1]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        if cond.pooled is None:
            raise ValueError("a Flux transformer needs CLIP's pooled vector in its conditioning; none was given")
        dt = self.transformer.dtype
        b, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"a Flux latent's height and width must be even (2x2 patches), got {h}x{w}")
        guidance = None
        if self.guidance_embeds:
            g = cond.extra.get("guidance")
            guidance = (
                torch.full((b,), self.guidance, device=x.device, dtype=torch.float32)
                if g is None
                else g.reshape(-1).to(x.device, torch.float32).expand(b)
            )
        # the pipeline's timestep is the scheduler's sigma * 1000 in float32, divided by 1000
        t = (sigma.float() * 1000).to(dt) / 1000
        text, pooled, kwargs = cond.crossattn, cond.pooled, {}
        if cond.nag is not None and cond.nag_settings is not None and cond.nag_settings.active:
            neg = cond.nag
            if neg.pooled is None:
                raise ValueError("NAG on Flux: the negative needs CLIP's pooled vector; none was given")
            if neg.crossattn.shape[1] != text.shape[1]:
                raise ValueError(
                    f"NAG on Flux: the negative has {neg.crossattn.shape[1]} T5 rows and the prompt "
                    f"{text.shape[1]}; Flux reads every row, so they must have the same count"
                )
            install_nag(self.transformer)
            text = torch.cat([text, neg.crossattn.to(text.device, text.dtype)])
            pooled = torch.cat([pooled, neg.pooled.to(pooled.device, pooled.dtype)])
            t = t.reshape(-1).expand(b).repeat(2)
            guidance = guidance.repeat(2) if guidance is not None else None
            kwargs["joint_attention_kwargs"] = {"nag": FluxNagContext(cond.nag_settings, b, text.shape[1])}
        v = self.transformer(
            hidden_states=pack(x).to(dt),
            timestep=t,
            guidance=guidance,
            pooled_projections=pooled.to(dt),
            encoder_hidden_states=text.to(dt),
            txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=dt),
            img_ids=self._image_ids(h, w, x.device, dt),
            return_dict=False,
            **kwargs,
        )[0][:b]
        v = unpack(v, h, w).to(x.dtype)
        s = sigma.to(x.dtype).view(-1, 1, 1, 1)
        return x - s * v


class FluxBackend(DiffusersBackend):
    """A Flux transformer + VAE + CLIP-L (``text_encoder``) + T5-XXL (``text_encoder_2``); ``unet`` holds
    the transformer, so the shared code (decode, device moves, description) applies unchanged."""

    flow = True

    def __post_init__(self):
        for key in _UNSUPPORTED:
            if self.scheduler_config.get(key):
                raise ModelLoadError(
                    f"{self.source}: the scheduler config sets {key}, which ReNeg's Flux schedule does not "
                    "implement (Flux.1 dev and schnell leave it unset)"
                )
        self._denoiser = FluxDenoiser(self.unet)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._null = None
        self.max_tokens = get_family(self.family).tokens
        self.image_size = (NATIVE_RESOLUTION, NATIVE_RESOLUTION)

    @property
    def transformer(self):
        return self.unet

    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def guidance(self) -> float:
        """The distilled guidance scale a dev model reads (3.5 unless set); schnell ignores it."""
        return self._denoiser.guidance

    @guidance.setter
    def guidance(self, value: float) -> None:
        self._denoiser.guidance = float(value)

    def set_prediction_type(self, prediction_type: str, reason: str = "") -> None:
        raise ModelLoadError(f"{self.source}: a Flux model predicts a flow velocity; --prediction-type does not apply")

    def describe(self) -> str:
        name = os.path.basename(os.path.normpath(self.source)) or self.source
        g = f", distilled guidance {self.guidance:g}" if self._denoiser.guidance_embeds else ""
        return f"{name}: {self.family} ({self.model_info.get('kind', 'model')}), rectified flow{g}, its own VAE"

    def attention_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """``(name, FluxAttention)`` for every joint text-image attention, double-stream blocks first."""
        t = self.transformer
        return [(f"transformer_blocks.{i}.attn", blk.attn) for i, blk in enumerate(t.transformer_blocks)] + [
            (f"single_transformer_blocks.{i}.attn", blk.attn) for i, blk in enumerate(t.single_transformer_blocks)
        ]

    # --- schedule -------------------------------------------------------------------------
    def alphas_cumprod(self) -> torch.Tensor:
        raise NotImplementedError("a flow-matching model has no alphas_cumprod; its schedule is flow times")

    def schedule(self, steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Flow times ``[steps + 1]`` for an image of ``height x width`` px (default: the size of the last
        :meth:`latent_shape` call, else 1024 x 1024): dev's shift grows with the number of latent patches."""
        h, w = (height, width) if height and width else self.image_size
        f = 2 * self.vae_scale
        return flow_schedule(self.scheduler_config, steps, (int(h) // f) * (int(w) // f))

    @property
    def native_resolution(self) -> int:
        return NATIVE_RESOLUTION

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = 2 * self.vae_scale  # the VAE's factor, then 2x2 patches
        if height % f or width % f:
            raise ValueError(f"a Flux model's height and width must be multiples of {f}, got {height}x{width}")
        self.image_size = (int(height), int(width))
        return (batch, self.unet.config.in_channels // 4, height // self.vae_scale, width // self.vae_scale)

    # --- text -----------------------------------------------------------------------------
    def truncation_note(self, prompts) -> str | None:
        tok = self.tokenizer
        try:
            self.tokenizer = self.tokenizer_2  # T5 reads the rows; its limit is the family's row count
            return super().truncation_note(prompts)
        finally:
            self.tokenizer = tok

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, L, 4096], pooled [B, 768])`` as FluxPipeline's ``encode_prompt``: T5 rows of the prompt
        padded to ``L`` and encoded without a mask; CLIP-L's pooled output of the prompt padded to 77."""
        # each encoder runs where its weights are (the CPU after offload_text_encoder()); results on self.device
        clip_ids = self._ids(self.tokenizer, prompts).to(module_device(self.text_encoder))
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(
            prompts, padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        ).input_ids
        rows = self.text_encoder_2(t5_ids.to(module_device(self.text_encoder_2)), output_hidden_states=False)[0]
        return rows.float().to(self.device), pooled.float().to(self.device)

    @property
    def pooled_dim(self) -> int:
        return int(self.transformer.config.pooled_projection_dim)

    def negative_cond(
        self, neg: torch.Tensor, pooled: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> Cond:
        """A negative's rows with a pooled vector (the empty prompt's unless one is given). Flux reads
        every row (no mask), and rows count in its joint attention, so a negative has the model's row
        count: a batch of conds of different lengths could not be batched without changing them."""
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError(
                f"{self.family} reads every row of a negative; an attention mask with padding does not apply"
            )
        if neg.dim() != 3 or neg.shape[0] != 1:
            raise ValueError(f"a negative must be [1, tokens, hidden], got {list(neg.shape)}")
        if neg.shape[1] != self.max_tokens:
            raise ValueError(
                f"this {self.family} model's negatives have {self.max_tokens} T5 rows (its prompts' count); "
                f"the negative has {neg.shape[1]}"
            )
        if pooled is None:
            pooled = self._empty()[1]
        return Cond(neg.to(self.device), pooled.reshape(1, -1).to(self.device))

    def set_performance(
        self,
        *,
        sdpa: bool | None = None,
        checkpointing: bool | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
    ) -> "FluxBackend":
        """As :meth:`DiffusersBackend.set_performance`, except that the transformer keeps its own
        ``FluxAttnProcessor`` (it applies the rotary embedding; it already uses fused attention) and
        ``channels_last`` applies to the VAE only (the transformer has no convolutions)."""
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        if sdpa is not None:
            self.vae.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())
        for m in (self.unet, self.vae):
            if checkpointing and getattr(m, "_supports_gradient_checkpointing", False):
                m.enable_gradient_checkpointing()
            elif checkpointing is not None and getattr(m, "_supports_gradient_checkpointing", False):
                m.disable_gradient_checkpointing()
        if channels_last is not None:
            self.vae.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if compile:
            self.unet.compile()
        return self


def flux_family(transformer) -> str:
    """``flux-dev`` when the transformer reads a distilled guidance scale, ``flux-schnell`` otherwise."""
    return "flux-dev" if getattr(transformer.config, "guidance_embeds", False) else "flux-schnell"


def load_folder(path: str, device="cpu", dtype: torch.dtype = torch.float32) -> FluxBackend:
    """Load a diffusers Flux.1 (dev or schnell) folder from local files only."""
    index = read_json(os.path.join(path, "model_index.json"))
    if not is_flux_index(index):
        raise ModelLoadError(f"{path}: model_index.json names {index.get('_class_name')!r}, not {PIPELINE}")
    require_parts(path, PIPELINE, T5_FOLDER_PARTS + ["text_encoder_2/config.json", "tokenizer_2"])
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel

    parts = {"transformer": FluxTransformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    m = load_parts(path, dtype, {**parts, "text_encoder_2": T5EncoderModel})
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(f"{path}: could not load the model: {str(e)[:400]}") from None
    tokenizer_2 = load_t5_tokenizer(os.path.join(path, "tokenizer_2"))
    sched = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    info = {"source": path, "kind": "diffusers folder", "vae": "inside"}
    return build_backend(
        m["transformer"], m["vae"], m["text_encoder"], tokenizer, m["text_encoder_2"], tokenizer_2, sched, path,
        device, dtype, info,
    )  # fmt: skip


def build_backend(transformer, vae, clip, tokenizer, t5, tokenizer_2, sched: dict, source: str, device, dtype,
                  model_info: dict) -> FluxBackend:  # fmt: skip
    """A :class:`FluxBackend` from its loaded parts (a folder's or ComfyUI's single files'), once they are
    checked to fit together: the T5 and CLIP widths the transformer reads, 2x2 patches of the VAE's
    channels."""
    family = flux_family(transformer)
    spec = get_family(family)
    cfg = transformer.config
    checks = (
        (
            "the T5 encoder's width",
            int(getattr(t5.config, "d_model", 0)),
            "joint_attention_dim",
            cfg.joint_attention_dim,
        ),
        ("CLIP's width", int(clip.config.hidden_size), "pooled_projection_dim", cfg.pooled_projection_dim),
    )
    for what, got, key, want in checks:
        if int(got) != int(want):
            raise ModelLoadError(f"{source}: {what} {got} does not match the transformer's {key} {want}")
    if int(cfg.joint_attention_dim) != spec.hidden or int(cfg.pooled_projection_dim) != spec.pooled:
        raise ModelLoadError(
            f"{source}: {spec.description} reads T5-XXL rows of width {spec.hidden} and a CLIP-L vector of "
            f"{spec.pooled}; this transformer reads {cfg.joint_attention_dim} and {cfg.pooled_projection_dim}"
        )
    if int(cfg.in_channels) != 4 * int(vae.config.latent_channels) or int(getattr(cfg, "patch_size", 1)) != 1:
        raise ModelLoadError(
            f"{source}: the transformer reads {cfg.in_channels} channels; a Flux.1 text-to-image transformer reads "
            f"2x2 patches of the VAE's {vae.config.latent_channels} latent channels ({4 * vae.config.latent_channels})"
        )
    for m in (transformer, vae, clip, t5):
        m.requires_grad_(False).eval()
    backend = FluxBackend(
        transformer,
        vae,
        clip,
        tokenizer,
        dict(sched),
        family,
        source,
        torch.device(device),
        dtype,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        model_info={**model_info, "family": family},
    )
    return backend.to(device)
