"""Wan 2.1 / 2.2 text-to-video through diffusers: the ``wan`` family's backend.

A diffusers ``WanPipeline`` folder (``model_index.json`` naming ``WanPipeline``, with ``transformer/``
(a ``WanTransformer3DModel``), for Wan 2.2 A14B also ``transformer_2/`` and a ``boundary_ratio``,
``vae/`` (an ``AutoencoderKLWan``), ``text_encoder/`` (a UMT5 encoder), ``tokenizer/`` and
``scheduler/``) loads into :class:`WanBackend`, which offers the operations every backend offers.

Wan is a flow-matching model (``x_t = (1 - t) x0 + t eps``; the transformer predicts the velocity
``eps - x0`` at timestep ``1000 t``): the denoiser returns ``x0 = x - t v`` and the backend says
``flow = True``, so the one sampler of :mod:`reneg.sampling` runs it (its step is the flow-matching
Euler step, CFG on x0 is CFG on v). Wan 2.2 A14B's two experts are switched as the pipeline switches
them: the high-noise ``transformer`` while ``1000 t >= boundary_ratio * 1000``, the low-noise
``transformer_2`` below; each may have its own guidance scale (:meth:`WanDenoiser.guided`).

Text: the prompt's UMT5 rows, zero past its own tokens (and end token), 512 rows, no attention mask in
the transformer, exactly as the pipeline's ``_get_t5_prompt_embeds`` makes them (see docs/wan.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..cond import Cond
from ..families import get_family
from .diffusers_backend import DiffusersBackend, ModelLoadError, module_device
from .parts import T5_FOLDER_PARTS, load_parts, load_t5_tokenizer, read_json, require_parts

FAMILY = "wan"
EXPERTS_FAMILY = "wan-experts"  # Wan 2.2 A14B, one negative per expert: two wan negatives in one file
# the scheduler config Wan-AI's Wan 2.1 T2V diffusers folders ship (UniPC on flow sigmas, shift 3); what the
# backend reads of it is the flow shift and the training timesteps
SCHEDULER = {
    "_class_name": "UniPCMultistepScheduler",
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "solver_order": 2,
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "timestep_spacing": "linspace",
}
# Wan 2.2 T2V A14B's release settings (its own config, wan/configs/wan_t2v_A14B.py): the experts switch at
# boundary 0.875 and it samples with shift 12
A14B_BOUNDARY = 0.875
A14B_FLOW_SHIFT = 12.0
# Wan 2.2 TI2V 5B's: shift 5 (its own config, wan/configs/wan_ti2v_5B.py, sample_shift 5.0; diffusers'
# scripts/convert_wan_to_diffusers.py writes UniPC with flow_shift 5.0, the rest UniPC's defaults, and
# WanPipeline(expand_timesteps=True) for it: the converter of Wan-AI's Wan2.2-TI2V-5B-Diffusers folder)
TI2V_FLOW_SHIFT = 5.0
EXPERT_MODES = ("shared", "per-expert")
TEXT_TO_VIDEO = ("WanPipeline",)
# Wan pipelines that read an image or a video besides the text: not text-to-video models
NOT_TEXT_TO_VIDEO = {
    "WanImageToVideoPipeline": "an image-to-video model",
    "WanVideoToVideoPipeline": "a video-to-video pipeline",
    "WanVACEPipeline": "a VACE (video editing / control) model",
    "WanAnimatePipeline": "a Wan-Animate (character animation) model",
    "WanSpeechToVideoPipeline": "a speech-to-video model",
}

# Wan's own negative prompt, as the official configs ship it (Wan2.1 / Wan2.2 repositories,
# wan/configs/shared_config.py, ``sample_neg_prompt``); nearly every workflow copies it
DEFAULT_NEGATIVE_ZH = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"  # noqa: RUF001
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"  # noqa: RUF001
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"  # noqa: RUF001
)
# its English rendering, from diffusers' WanPipeline example (diffusers/pipelines/wan/pipeline_wan.py)
DEFAULT_NEGATIVE_EN = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards"
)


def wan_kind(index: dict) -> str | None:
    """``"t2v"`` for a WanPipeline folder, another pipeline's description for the Wan pipelines that
    read an image or video, None for anything else."""
    name = str(index.get("_class_name", ""))
    if name in TEXT_TO_VIDEO:
        return "t2v"
    return NOT_TEXT_TO_VIDEO.get(name)


def is_wan_folder(path: str) -> bool:
    p = os.path.join(os.fspath(path), "model_index.json")
    return os.path.isfile(p) and wan_kind(read_json(p)) is not None


def latent_frames(frames: int, temporal: int = 4) -> int:
    """Latent frames for ``frames`` video frames: Wan's VAE keeps the first frame and packs each next
    ``temporal`` (4) into one, so a video has ``4 k + 1`` frames (1 frame: image mode)."""
    if frames < 1 or (frames - 1) % temporal:
        ok = ", ".join(str(temporal * k + 1) for k in range(4))
        raise ModelLoadError(f"--frames {frames}: Wan makes {temporal} k + 1 frames ({ok}, ...)")
    return (frames - 1) // temporal + 1


class WanDenoiser:
    """``D(x [B, C, F, h, w], t [B], cond) -> x0`` around one or two ``WanTransformer3DModel``.

    ``boundary``: Wan 2.2 A14B's ``boundary_ratio``; a step at ``1000 t >= 1000 boundary`` runs the
    high-noise ``transformer``, one below it ``transformer_2`` (as ``WanPipeline`` switches). A cond
    may carry the low-noise expert's own rows in ``extra["expert_2"]`` (a negative learned per expert);
    otherwise both experts read ``crossattn``."""

    flow = True
    prediction_type = "flow"

    def __init__(self, transformer, transformer_2=None, boundary: float | None = None, train_steps: int = 1000):
        if (transformer_2 is None) != (boundary is None):
            raise ModelLoadError("a second Wan expert needs a boundary_ratio, and a boundary_ratio a second expert")
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary = boundary
        self.train_steps = int(train_steps)
        self.expand_timesteps = False  # Wan 2.2 TI2V 5B: one timestep per latent token

    @property
    def unet(self):  # the shared backend code (device moves, dtype) reads the main network as ``unet``
        return self.transformer

    def expert(self, sigma: float) -> int:
        """0 (``transformer``) or 1 (``transformer_2``) for a step at flow time ``sigma``."""
        if self.transformer_2 is None:
            return 0
        t = float(torch.tensor(float(sigma), dtype=torch.float32) * self.train_steps)
        return 0 if t >= self.boundary * self.train_steps else 1

    guidance_2: float | None = None  # the low-noise expert's own guidance scale (None: the sampler's)

    def step_guidance(self, sigma: torch.Tensor, scale: float) -> float:
        """The guidance scale at a step (:func:`reneg.sampling.step_scale`): the low-noise expert's
        ``guidance_2`` where one is set (``WanPipeline``'s ``guidance_scale_2``), else ``scale``."""
        if self.guidance_2 is None or self.expert(float(sigma.reshape(-1)[0])) == 0:
            return scale
        return float(self.guidance_2)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"Wan latents are [B, C, F, h, w], got {list(x.shape)}")
        k = self.expert(float(sigma.reshape(-1)[0]))
        model = self.transformer if k == 0 else self.transformer_2
        rows = cond.extra.get("expert_2", cond.crossattn) if k == 1 else cond.crossattn
        dt = model.dtype
        t = sigma.float() * self.train_steps
        if self.expand_timesteps:  # one timestep per (1, 2, 2) patch, all equal in text-to-video
            p = model.config.patch_size
            n = x.shape[2] // p[0] * (x.shape[3] // p[1]) * (x.shape[4] // p[2])
            t = t[:, None].expand(-1, n)
        v = model(
            hidden_states=x.to(dt),
            timestep=t,
            encoder_hidden_states=rows.to(dt),
            return_dict=False,
        )[0].to(x.dtype)
        s = sigma.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return x - s * v


@dataclass
class WanBackend(DiffusersBackend):
    """A Wan transformer (two for A14B) + Wan VAE + UMT5 encoder; ``unet`` holds the (first) transformer,
    so the shared code (device moves, notes, truncation) applies."""

    transformer_2: object = None
    boundary_ratio: float | None = None
    frames: int = 1

    flow = True

    def __post_init__(self):
        c = self.scheduler_config
        self._denoiser = WanDenoiser(
            self.unet, self.transformer_2, self.boundary_ratio, int(c.get("num_train_timesteps", 1000))
        )
        self._denoiser.expand_timesteps = bool(self.model_info.get("expand_timesteps", False))
        self._cache: dict[str, torch.Tensor] = {}
        self._null = None
        self.max_tokens = get_family(FAMILY).tokens
        self._latent_frames = latent_frames(self.frames, self.temporal_scale)

    @property
    def transformer(self):
        return self.unet

    @property
    def experts(self) -> int:
        return 1 if self.transformer_2 is None else 2

    @property
    def denoiser(self) -> WanDenoiser:
        return self._denoiser

    @property
    def prediction_type(self) -> str:
        return "flow"

    def set_prediction_type(self, prediction_type: str, reason: str = "") -> None:
        raise ModelLoadError(f"{self.source}: Wan is a flow-matching model; --prediction-type does not apply")

    def describe(self) -> str:
        name = os.path.basename(os.path.normpath(self.source)) or self.source
        two = (
            f", two experts switched at boundary_ratio {self.boundary_ratio}" if self.transformer_2 is not None else ""
        )
        return f"{name}: wan ({self.model_info.get('kind', 'diffusers folder')}), flow matching{two}, its own VAE"

    # --- schedule -------------------------------------------------------------------------
    @property
    def shift(self) -> float:
        """The flow shift the folder's scheduler uses (UniPC's ``flow_shift``, FlowMatchEuler's ``shift``)."""
        c = self.scheduler_config
        return float(c.get("flow_shift") or c.get("shift") or 1.0)

    def schedule(self, steps: int) -> torch.Tensor:
        """Flow times ``[steps + 1]`` ending at 0: ``FlowMatchEulerDiscreteScheduler``'s sigmas with the
        folder's shift (the sampler's step on them is that scheduler's Euler step). The folder's own
        scheduler (UniPC, a multistep solver) visits the same times but steps with a higher order."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        sched = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=int(self.scheduler_config.get("num_train_timesteps", 1000)), shift=self.shift
        )
        sched.set_timesteps(steps)
        return sched.sigmas.double()

    # --- shapes and decoding ----------------------------------------------------------------
    @property
    def vae_scale(self) -> int:
        return int(getattr(self.vae.config, "scale_factor_spatial", 8))

    @property
    def temporal_scale(self) -> int:
        return int(getattr(self.vae.config, "scale_factor_temporal", 4))

    @property
    def native_resolution(self) -> None:
        return None  # Wan's transformer has no native size (480p and 720p releases share it)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        p = self.unet.config.patch_size
        f = self.vae_scale
        mh, mw = f * p[1], f * p[2]
        if height % mh or width % mw:
            raise ValueError(f"Wan needs height and width in multiples of {mh}x{mw}, got {height}x{width}")
        return (batch, self.unet.config.in_channels, self._latent_frames, height // f, width // f)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Frames ``[B * F, 3, H, W]`` in [-1, 1] (``F = 4 (f - 1) + 1`` for ``f`` latent frames), so an
        image reward scores frames: the latents are un-normalised with the VAE's ``latents_mean`` /
        ``latents_std`` and decoded by ``AutoencoderKLWan``, as the pipeline does."""
        vae = self.vae
        z_dim = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean, dtype=x0.dtype, device=x0.device).view(1, z_dim, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, dtype=x0.dtype, device=x0.device).view(1, z_dim, 1, 1, 1)
        video = vae.decode((x0 * std + mean).to(vae.dtype), return_dict=False)[0]
        video = video.to(torch.promote_types(video.dtype, torch.float32)).clamp(-1, 1)
        b, c, f, h, w = video.shape
        return video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)

    # --- text -------------------------------------------------------------------------------
    @property
    def pooled_dim(self) -> None:
        return None

    @torch.no_grad()
    def _encode_rows(self, prompt: str) -> torch.Tensor:
        """``[512, 4096]`` as ``WanPipeline._get_t5_prompt_embeds`` makes them: the cleaned prompt
        (diffusers' own ``prompt_clean``) tokenized to 512 with the end token, encoded with its attention
        mask, every row past its tokens zeroed."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tok = self.tokenizer(
            [prompt_clean(prompt)],
            padding="max_length",
            max_length=self.max_tokens,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        dev = module_device(self.text_encoder)  # the CPU after offload_text_encoder(); rows on self.device
        mask = tok.attention_mask.to(dev)
        rows = self.text_encoder(tok.input_ids.to(dev), mask).last_hidden_state[0].float().to(self.device)
        n = int(mask.gt(0).sum())
        rows[n:] = 0
        return rows

    # --- one negative per expert (Wan 2.2 A14B) ----------------------------------------------
    @property
    def per_expert(self) -> bool:
        return self.family == EXPERTS_FAMILY

    def set_experts(self, mode: str) -> None:
        """``shared``: one negative for both experts (family ``wan``); ``per-expert``: one each, a
        ``[1, 1024, 4096]`` negative (the high-noise expert's rows, then the low-noise one's; family
        ``wan-experts``). Per-expert needs a model with two experts."""
        if mode not in EXPERT_MODES:
            raise ModelLoadError(f"--wan-experts {mode}: expected one of {', '.join(EXPERT_MODES)}")
        if mode == "per-expert" and self.transformer_2 is None:
            raise ModelLoadError(
                f"--wan-experts per-expert: {self.source} has one transformer (Wan 2.1 / 2.2 5B); one negative "
                f"per expert needs Wan 2.2 A14B's two (transformer and transformer_2)"
            )
        self.family = EXPERTS_FAMILY if mode == "per-expert" else FAMILY
        self.model_info["family"] = self.family

    def _two(self, cond: Cond) -> Cond:
        """In per-expert mode every cond carries the low-noise expert's rows (``extra["expert_2"]``), so
        positive and negative conds batch together."""
        if self.per_expert and "expert_2" not in cond.extra:
            return Cond(cond.crossattn, cond.pooled, dict(cond.extra, expert_2=cond.crossattn), cond.mask)
        return cond

    def encode_prompts(self, prompts: list[str]) -> Cond:
        for p in dict.fromkeys(prompts):
            if p not in self._cache:
                self._cache[p] = self._keep(self._encode_rows(p))
        self._trim_cache(prompts)
        return self._two(Cond(torch.stack([self._use(self._cache[p]) for p in prompts])))

    def null_embedding(self) -> tuple[torch.Tensor, None]:
        """``E("")``: the end token's row, then 511 zero rows (what the pipeline uses for ``negative_prompt=""``);
        in per-expert mode once per expert, ``[1, 1024, 4096]``."""
        if self._null is None:
            self._null = self._encode_rows("")[None]
        null = self._null.clone()
        return (torch.cat([null, null], dim=1) if self.per_expert else null), None

    def negative_cond(
        self, neg: torch.Tensor, pooled: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> Cond:
        """A negative ``[1, L <= 512, 4096]``; fewer rows are padded with zero rows (the rows a prompt's
        padding is), and rows a given ``mask`` marks as padding are zeroed, as ComfyUI's
        ``zero_out_masked`` does."""
        if pooled is not None:
            raise ValueError("Wan reads no pooled vector; a pooled vector was given with the negative")
        if neg.dim() != 3 or neg.shape[0] != 1:
            raise ValueError(f"a negative must be [1, tokens, hidden], got {list(neg.shape)}")
        if neg.shape[1] == 2 * self.max_tokens:  # one negative per expert
            if not self.per_expert:
                raise ValueError(
                    f"a wan-experts negative (one per expert, {neg.shape[1]} rows) needs Wan 2.2 A14B's two experts "
                    f"used per expert (--wan-experts per-expert); this model reads one {self.family} negative"
                )
            high = self.negative_cond(
                neg[:, : self.max_tokens], mask=None if mask is None else mask[..., : self.max_tokens]
            )
            low = self.negative_cond(
                neg[:, self.max_tokens :], mask=None if mask is None else mask[..., self.max_tokens :]
            )
            return Cond(high.crossattn, extra={"expert_2": low.crossattn})
        if neg.shape[1] > self.max_tokens:
            raise ValueError(f"Wan reads {self.max_tokens} text rows; the negative has {neg.shape[1]}")
        neg = neg.to(self.device)
        if mask is not None:
            m = mask.reshape(1, -1).to(neg.device)
            if m.shape[1] != neg.shape[1]:
                raise ValueError(f"the attention mask covers {m.shape[1]} rows, the negative has {neg.shape[1]}")
            neg = neg * m.to(neg.dtype)[..., None]
        if neg.shape[1] < self.max_tokens:
            neg = torch.cat([neg, neg.new_zeros(1, self.max_tokens - neg.shape[1], neg.shape[2])], dim=1)
        return self._two(Cond(neg))

    def to(self, device) -> "WanBackend":
        self.device = torch.device(device)
        for m in (self.unet, self.transformer_2, self.vae, self.text_encoder):
            if m is not None:
                m.to(self.device)
        self._cache.clear()
        self._null = None
        self._text_offloaded = None  # the text encoder is back on the device
        return self

    def set_performance(self, *, sdpa=None, checkpointing=None, channels_last=None, compile=False) -> "WanBackend":
        """Wan's attention already runs through PyTorch's fused attention (diffusers' Wan processor), so
        ``sdpa`` and ``channels_last`` (a 2-D convolution layout) change nothing here; ``checkpointing``
        recomputes the transformers' blocks during backward; ``compile`` compiles them."""
        for m in (self.unet, self.transformer_2):
            if m is None:
                continue
            if checkpointing:
                m.enable_gradient_checkpointing()
            elif checkpointing is not None:
                m.disable_gradient_checkpointing()
            if compile:
                m.compile()
        return self


def load_folder(path: str, device="cpu", dtype: torch.dtype = torch.float32, frames: int | None = None) -> WanBackend:
    """Load a local diffusers ``WanPipeline`` folder (Wan 2.1, Wan 2.2 A14B with ``transformer_2``, Wan
    2.2 TI2V 5B used for text-to-video); ``frames`` per video, 1 (image mode) when None."""
    index = read_json(os.path.join(path, "model_index.json"))
    kind = wan_kind(index)
    if kind != "t2v":
        what = kind or f"{index.get('_class_name')!r}"
        raise ModelLoadError(
            f"{path}: {what} ({index.get('_class_name')}); ReNeg learns negatives for Wan text-to-video "
            f"models (WanPipeline folders: Wan 2.1 T2V, Wan 2.2 T2V A14B, Wan 2.2 TI2V 5B)"
        )
    two = bool(index.get("transformer_2")) and index["transformer_2"][0] is not None
    require_parts(path, "WanPipeline", T5_FOLDER_PARTS + (["transformer_2/config.json"] if two else []))
    boundary = index.get("boundary_ratio")
    if two and boundary is None:
        raise ModelLoadError(f"{path}: two transformers (Wan 2.2 A14B) but model_index.json gives no boundary_ratio")
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    parts = {"transformer": WanTransformer3DModel, "vae": AutoencoderKLWan, "text_encoder": UMT5EncoderModel}
    m = load_parts(path, dtype, {**parts, **({"transformer_2": WanTransformer3DModel} if two else {})})
    transformer, transformer_2 = m["transformer"], m.get("transformer_2")
    vae, text_encoder = m["vae"], m["text_encoder"]
    tokenizer = load_t5_tokenizer(os.path.join(path, "tokenizer"), AutoTokenizer)
    sched = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    info = {
        "source": path,
        "kind": "diffusers folder",
        "expand_timesteps": bool(index.get("expand_timesteps", False)),
        "vae": "inside",
    }
    return build_backend(transformer, transformer_2, boundary, vae, text_encoder, tokenizer, sched, path, device,
                         dtype, info, frames)  # fmt: skip


def build_backend(transformer, transformer_2, boundary, vae, text_encoder, tokenizer, sched: dict, path: str,
                  device, dtype, info: dict, frames: int | None = None) -> WanBackend:  # fmt: skip
    """A :class:`WanBackend` from its parts (a folder's or the single files'), after checking that they belong
    together: text-to-video transformers reading UMT5-XXL's 4096-wide rows, a 4096-wide encoder, and the
    VAE's latent channels the transformer's input."""
    spec = get_family(FAMILY)
    for name, t in (("transformer", transformer), ("transformer_2", transformer_2)):
        if t is None:
            continue
        if getattr(t.config, "image_dim", None):
            raise ModelLoadError(
                f"{path}: {name} reads CLIP image features (image_dim {t.config.image_dim}): an image-to-video "
                f"model; ReNeg learns negatives for Wan text-to-video models"
            )
        if int(t.config.text_dim) != spec.hidden:
            raise ModelLoadError(f"{path}: {name} reads text of width {t.config.text_dim}; Wan's UMT5-XXL is 4096")
    d_model = int(getattr(text_encoder.config, "d_model", 0))
    if d_model != spec.hidden:
        raise ModelLoadError(f"{path}: Wan reads UMT5-XXL rows of width {spec.hidden}; this text encoder is {d_model}")
    if transformer.config.in_channels != vae.config.z_dim:
        raise ModelLoadError(
            f"{path}: the transformer reads {transformer.config.in_channels} latent channels, the VAE makes "
            f"{vae.config.z_dim}"
        )
    for m in (transformer, transformer_2, vae, text_encoder):
        if m is not None:
            m.requires_grad_(False).eval()
    two = transformer_2 is not None
    info = {
        **info,
        "family": FAMILY,
        "architecture": "Wan 2.2 A14B (two experts)" if two else "Wan",
        "experts": 2 if two else 1,
        "boundary_ratio": boundary,
    }
    backend = WanBackend(
        transformer,
        vae,
        text_encoder,
        tokenizer,
        dict(sched),
        FAMILY,
        path,
        torch.device(device),
        dtype,
        model_info=info,
        transformer_2=transformer_2,
        boundary_ratio=float(boundary) if two else None,
        frames=1 if frames is None else int(frames),
    )
    return backend.to(device)
