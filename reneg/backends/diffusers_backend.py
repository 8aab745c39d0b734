"""Diffusers backend: SD1.x / SD2.x (eps and v-prediction) and SDXL around diffusers modules.

The modules come from :func:`reneg.backends.loading.load_diffusers` (a diffusers
folder, or a single-file checkpoint through :mod:`reneg.backends.single_file`).

SDXL: the cross-attention conditioning is both encoders'
penultimate hidden states side by side, ``[B, 77, 768 + 1280]``; the UNet also
reads the second encoder's projected pooled vector ``[B, 1280]`` and six size
numbers ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``. The
denoiser derives the size numbers from the latent it is given, as diffusers'
``StableDiffusionXLPipeline`` does by default (no crop, original = target size).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..cond import Cond
from ..options import PROMPT_CACHE_MAX
from ..sampling import ddim_schedule, sigmas_from_alphas_cumprod


class ModelLoadError(ValueError):
    pass


# the attributes a backend keeps its text encoders in (SDXL and Flux have two; SD3-style pipelines three)
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")


def module_device(module) -> torch.device:
    """The device a module's weights are on (the CPU for one without weights)."""
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


class DiffusersDenoiser:
    """``D(x, sigma, cond) -> x0`` around a diffusers UNet (see :mod:`reneg.sampling`).

    A cond carrying a NAG negative (``cond.nag``) is guided in every cross-attention (:mod:`reneg.nag`)."""

    supports_nag = True

    def __init__(self, unet, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", vae_scale: int = 8):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ModelLoadError(f"prediction type {prediction_type!r} is not supported (epsilon and v_prediction are)")
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

    def nag_kwargs(self, cond: Cond) -> dict:
        """The model call's ``cross_attention_kwargs`` for a cond carrying a NAG negative (else none):
        every subclass's ``__call__`` passes them, so no model silently samples without its NAG."""
        if cond.nag is None:
            return {}
        from ..nag import NagContext, install

        install(self.unet)  # once; set_performance's processors are wrapped again here
        dt = self.unet.dtype
        return {
            "cross_attention_kwargs": {"nag": NagContext(cond.nag.crossattn.to(dt), cond.nag.mask, cond.nag_settings)}
        }

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
        kwargs.update(self.nag_kwargs(cond))
        out = self.unet(
            (x * c_in).to(dt),
            self.timestep(sigma),
            encoder_hidden_states=cond.crossattn.to(dt),
            return_dict=False,
            **kwargs,
        )[0].to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - s * out
        return x * c_in * c_in - s * c_in * out


# alphas_cumprod at the last timestep of a zero-terminal-SNR schedule, where the exact value 0
# would put sigma at infinity; ComfyUI uses this number for "ztsnr" checkpoints (sigma about 4519)
ZTSNR_LAST_ALPHA_CUMPROD = 4.8973451890853435e-08


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Rescale a schedule to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed"; diffusers' ``rescale_betas_zero_snr``), keeping the last step finite."""
    a = alphas_cumprod.double().sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * a0 / (a0 - aT)
    ac = a * a
    ac[-1] = ZTSNR_LAST_ALPHA_CUMPROD
    return ac.float()


def _moved(entry, device):
    """A tensor, or a tuple of tensors and Nones (a cache entry), on ``device``."""
    if isinstance(entry, torch.Tensor):
        return entry.to(device)
    if isinstance(entry, tuple):
        return tuple(_moved(x, device) for x in entry)
    return entry


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
    # where the model came from and how it was read (file kind, prediction type and why, VAE)
    model_info: dict = field(default_factory=dict)

    def __post_init__(self):
        ac = self.alphas_cumprod()
        self._denoiser = DiffusersDenoiser(
            self.unet, ac, self.scheduler_config.get("prediction_type", "epsilon"), self.vae_scale
        )
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._null: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def set_prediction_type(self, prediction_type: str, reason: str = "") -> None:
        """Use ``epsilon`` or ``v_prediction`` from now on (e.g. ``--prediction-type``)."""
        self.scheduler_config["prediction_type"] = prediction_type
        self._denoiser = DiffusersDenoiser(self.unet, self.alphas_cumprod(), prediction_type, self.vae_scale)
        self.model_info.update(prediction_type=prediction_type, prediction_reason=reason)

    def describe(self) -> str:
        """One line: the model, its family, its prediction type and why, and its VAE."""
        i = self.model_info
        name = os.path.basename(os.path.normpath(self.source)) or self.source
        pt = "v-prediction" if self.prediction_type == "v_prediction" else "eps-prediction"
        why = f" ({i['prediction_reason']})" if i.get("prediction_reason") else ""
        ztsnr = ", zero-terminal-SNR schedule" if self.scheduler_config.get("rescale_betas_zero_snr") else ""
        vae = i.get("vae", "inside")
        vae = "its own VAE" if vae == "inside" else f"VAE {vae}"
        kind = i.get("architecture") or self.family
        return f"{name}: {kind} ({i.get('kind', 'model')}), {pt}{why}{ztsnr}, {vae}"

    # --- schedule -------------------------------------------------------------------------
    def alphas_cumprod(self) -> torch.Tensor:
        c = self.scheduler_config
        n = int(c.get("num_train_timesteps", 1000))
        b0, b1 = float(c.get("beta_start", 0.00085)), float(c.get("beta_end", 0.012))
        kind = c.get("beta_schedule", "scaled_linear")
        if c.get("trained_betas") is not None:
            betas = torch.tensor(c["trained_betas"], dtype=torch.float32)
        elif kind == "scaled_linear":
            betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float32) ** 2
        elif kind == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float32)
        else:
            raise ModelLoadError(f"{self.source}: beta_schedule {kind!r} is not supported")
        ac = torch.cumprod(1.0 - betas, dim=0)
        if c.get("rescale_betas_zero_snr"):
            ac = zero_terminal_snr(ac)
        return ac

    def schedule(self, steps: int) -> torch.Tensor:
        c = self.scheduler_config
        return ddim_schedule(
            self.alphas_cumprod(),
            steps,
            int(c.get("steps_offset", 1)),
            c.get("timestep_spacing", "leading"),
            bool(c.get("set_alpha_to_one", False)),
        )

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
        return (
            f"note: {name} makes {n} px images natively; --resolution {resolution} works at "
            f"{resolution} px (--resolution {n} uses the model's own size)"
        )

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        return (batch, self.unet.config.in_channels, height // f, width // f)

    def truncation_note(self, prompts) -> str | None:
        """A one-line note when prompts are longer than the text encoder reads (CLIP: 77 tokens with
        its start and end tokens), which cuts them as every UI does; None when none is. One
        tokenizer pass over the distinct prompts, so a run says it once, up front."""
        tok = getattr(self, "tokenizer", None)
        limit = getattr(self, "max_tokens", None) or getattr(tok, "model_max_length", None)
        texts = list(dict.fromkeys(str(p) for p in prompts))
        if tok is None or not isinstance(limit, int) or limit > 100_000 or not texts:
            return None
        try:
            ids = tok(texts, truncation=False, padding=False, verbose=False)["input_ids"]
        except Exception:  # noqa: BLE001 - a note must never stop a run
            return None
        cut = [t for t, i in zip(texts, ids) if len(i) > limit]
        if not cut:
            return None
        first = cut[0] if len(cut[0]) <= 60 else cut[0][:57] + "..."
        return (
            f"note: {len(cut)} of {len(texts)} prompts are longer than the text encoder's {limit} tokens "
            f"and are cut to {limit} (the model reads no more), e.g. {first!r}"
        )

    @staticmethod
    def _ids(tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([B, 77, D], pooled [B, P] or None)`` as diffusers' pipelines encode prompts; each encoder
        runs where its weights are (the CPU after :meth:`offload_text_encoder`), the result is on
        the backend's device."""
        dev = self.device
        if self.text_encoder_2 is None:
            te = self.text_encoder
            out = te(self._ids(self.tokenizer, prompts).to(module_device(te)), return_dict=True)
            return out.last_hidden_state.float().to(dev), None
        parts = []
        for tok, te in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = te(self._ids(tok, prompts).to(module_device(te)), output_hidden_states=True, return_dict=True)
            parts.append(out.hidden_states[-2].float().to(dev))
        return torch.cat(parts, dim=-1), out.text_embeds.float().to(dev)

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Cached per prompt: a training run sees each prompt many times."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        for p in missing:  # one at a time: an encoding never depends on the prompts beside it (exact resume)
            crossattn, pooled = self._encode([p])
            self._cache[p] = self._keep((crossattn[0], None if pooled is None else pooled[0]))
        self._trim_cache(prompts)
        rows = [self._use(self._cache[p]) for p in prompts]
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

    def negative_cond(
        self, neg: torch.Tensor, pooled: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> Cond:
        """A negative's Cond; SDXL's pooled vector is the empty prompt's unless one is given.
        ``mask`` is for the T5 families (:mod:`reneg.backends.pixart`); CLIP families read every row."""
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError(
                f"{self.family} reads every row of a negative; an attention mask with padding "
                f"belongs to a T5 (PixArt) negative"
            )
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
        """Every part on ``device`` (the text encoders too: an :meth:`offload_text_encoder` is undone)."""
        self.device = torch.device(device)
        for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if m is not None:
                m.to(self.device)
        self._cache.clear()
        self._null = None
        self._text_offloaded = None
        return self

    # --- text encoders off the compute device --------------------------------------------------
    def text_encoders(self) -> list[tuple[str, object]]:
        """``(attribute, module)`` of each text encoder the backend holds (``text_encoder``,
        ``text_encoder_2``, ``text_encoder_3``)."""
        return [(n, getattr(self, n)) for n in TEXT_ENCODER_NAMES if getattr(self, n, None) is not None]

    def text_cache_bytes(self) -> int:
        """The bytes the cached prompt encodings (and ``E("")``) hold (on the CPU once the text encoders are
        offloaded; ``E("")`` stays on the backend's device)."""
        seen, total = set(), 0

        def add(v):
            nonlocal total
            if isinstance(v, torch.Tensor):
                if id(v) not in seen:
                    seen.add(id(v))
                    total += v.numel() * v.element_size()
            elif isinstance(v, (tuple, list)):
                for x in v:
                    add(x)

        for v in getattr(self, "_cache", {}).values():
            add(v)
        add(getattr(self, "_null", None))
        return total

    def offload_text_encoder(self, device="cpu", warn=None) -> dict[str, int]:
        """Move the text encoder(s) to ``device`` (the CPU), so the compute device holds only the
        denoiser and the VAE: for a run whose prompts are all encoded (and cached) already. A prompt
        encoded later is still encoded, exactly, where the encoder now is (slowly), its result on the
        backend's device; the first such call is said once through ``warn(message)`` (default:
        :func:`warnings.warn`). Returns each moved encoder's parameter count by attribute name;
        :meth:`to` moves them back."""
        target = torch.device(device)
        # the prompt cache goes with them: the largest thing left on the card otherwise (a T5 prompt's rows are
        # 8.4 MB in float32); :meth:`_use` brings each batch's rows back, :meth:`to` clears it
        self._cache = {p: _moved(v, target) for p, v in self._cache.items()}
        moved = {}
        for name, m in self.text_encoders():
            m.to(target)
            moved[name] = sum(p.numel() for p in m.parameters())
            if id(m) not in getattr(self, "_late_hooks", {}):
                self._late_hooks = dict(getattr(self, "_late_hooks", {}))
                self._late_hooks[id(m)] = self._watch_late_calls(name, m)
        self._text_offloaded = target
        self._late_warn = warn
        return moved

    def _trim_cache(self, prompts: list[str]) -> None:
        """Past :data:`PROMPT_CACHE_MAX` cached prompts, keep only this batch's (a run over more prompts than that
        encodes them again as they come)."""
        if len(self._cache) > PROMPT_CACHE_MAX:
            self._cache = {p: self._cache[p] for p in dict.fromkeys(prompts)}

    def _keep(self, entry):
        """A prompt cache entry as the cache keeps it: where the text encoders went once offloaded, else as made."""
        where = getattr(self, "_text_offloaded", None)
        return entry if where is None else _moved(entry, where)

    def _use(self, entry):
        """A prompt cache entry on the backend's device, for a batch."""
        return _moved(entry, self.device) if self.text_offloaded else entry

    @property
    def text_offloaded(self) -> bool:
        """Whether :meth:`offload_text_encoder` moved the text encoders off the compute device."""
        return getattr(self, "_text_offloaded", None) is not None

    def _watch_late_calls(self, name: str, encoder) -> list:
        """Hooks counting the encoder's calls while it is offloaded (``late_encoder_calls``) and saying the
        first. On the encoder and on its inner ``model`` (Qwen-Image calls that one, for the hidden states
        without the logits); a call through both counts once."""
        depth = [0]

        def pre(_module, _args):
            depth[0] += 1
            if depth[0] > 1 or not self.text_offloaded:
                return
            self.late_encoder_calls = getattr(self, "late_encoder_calls", 0) + 1
            if self.late_encoder_calls == 1:
                msg = (
                    f"a prompt was encoded after the text encoder was offloaded: {name} runs on "
                    f"{module_device(encoder)} now (correct, but slow); every prompt the run needs should "
                    f"be encoded before offload_text_encoder()"
                )
                if self._late_warn is not None:
                    self._late_warn(msg)
                else:
                    import warnings

                    warnings.warn(msg, stacklevel=2)

        def post(_module, _args, _out):
            depth[0] -= 1

        handles = []
        inner = getattr(encoder, "model", None)
        for m in [encoder] + ([inner] if isinstance(inner, torch.nn.Module) else []):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post, always_call=True))
        return handles

    def set_performance(
        self,
        *,
        sdpa: bool | None = None,
        checkpointing: bool | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
    ) -> "DiffusersBackend":
        """Speed and memory switches (docs/performance.md); none changes the maths.

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
