"""ComfyUI backend: a :class:`reneg.backends.base.Backend` over a MODEL and a VAE.

Only torch and the core are imported here; ComfyUI's own modules are imported inside the functions
that need them, so the module also loads (and is tested) with small stand-ins for ``comfy.*``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
from typing import Iterator

import torch

from ..cond import Cond
from ..families import FAMILIES, family_for_hidden, family_for_model, known_hidden_sizes
from ..sampling import uniform_schedule


class ComfyModelError(ValueError):
    """The MODEL / VAE / CONDITIONING given to a node can not be used."""


def conditioning_to_cond(conditioning, what: str = "conditioning") -> Cond:
    """A ComfyUI CONDITIONING (``[[tensor [B,L,D], {"pooled_output": ...}], ...]``) as a Cond.

    Only plain conditioning with one entry is supported (the output of a text
    encoder node, or of Load ReNeg Embedding); areas, masks and combined entries
    are not part of the ReNeg objective.
    """
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ComfyModelError(
            f"{what}: expected a CONDITIONING (a list of [tensor, dict]), "
            f"found {type(conditioning).__name__}"
            f"{' (empty)' if isinstance(conditioning, (list, tuple)) else ''}"
        )
    if len(conditioning) != 1:
        raise ComfyModelError(
            f"{what}: expected plain conditioning with one entry (a text encoder's "
            f"output), found {len(conditioning)} entries (combined or area "
            f"conditioning can not be tuned)"
        )
    entry = conditioning[0]
    if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not isinstance(entry[0], torch.Tensor):
        raise ComfyModelError(f"{what}: expected entries of [tensor, dict], found {type(entry).__name__}")
    t, extra = entry[0], entry[1] if isinstance(entry[1], dict) else {}
    if t.dim() != 3 or t.shape[0] != 1:
        raise ComfyModelError(f"{what}: expected a tensor of shape [1, tokens, hidden], found {list(t.shape)}")
    ignored = sorted(k for k in ("area", "mask", "control", "gligen") if extra.get(k) is not None)
    if ignored:
        raise ComfyModelError(
            f"{what}: carries {', '.join(ignored)}; per-sample tuning takes plain "
            f"text conditioning (connect the text encoder's output)"
        )
    pooled = extra.get("pooled_output")
    return Cond(t, pooled if isinstance(pooled, torch.Tensor) else None)


def clone_normal(t: torch.Tensor | None) -> torch.Tensor | None:
    """A normal (non-inference) detached copy of ``t``; call under ``inference_mode(False)``."""
    if t is None:
        return None
    with torch.inference_mode(False):
        return t.detach().clone()


class ComfyDenoiser:
    """``D(x, sigma, cond) -> x0`` through ``model.model.apply_model``, which already is the denoiser
    of :mod:`reneg.sampling`: it takes sigma, scales the input and returns x0 whatever the
    parameterisation (eps or v). A cond carrying a NAG negative adds NAG's attention patches
    (:func:`reneg.nag.comfy_transformer_options`) to this call's ``transformer_options``."""

    supports_nag = True

    def __init__(self, patcher, patcher_2=None, boundary: float | None = None):
        self.patcher = patcher
        self.model = patcher.model
        # Wan 2.2 A14B: the low-noise expert's MODEL, run where sigma (the flow time) is below ``boundary``
        self.boundary = boundary
        self.experts = None if patcher_2 is None else (ComfyDenoiser(patcher), ComfyDenoiser(patcher_2))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        if self.experts is not None:
            sigmas = sigma.reshape(-1).expand(x.shape[0])
            low = sigmas < self.boundary
            out = torch.empty_like(x)
            for mask, expert in zip((~low, low), self.experts):
                idx = mask.nonzero().flatten()
                if len(idx):
                    out[idx] = expert(x[idx], sigmas[idx], cond.index(idx))
            return out
        if cond.mask is not None and not bool(cond.mask.bool().all()):
            return self._by_length(x, sigma, cond)
        options = getattr(self.patcher, "model_options", None) or {}
        transformer_options = dict(options.get("transformer_options", {}))
        transformer_options["sigmas"] = sigma
        if cond.nag is not None:
            from ..nag import check_comfy_model, comfy_transformer_options

            check_comfy_model(self.model)
            transformer_options = comfy_transformer_options(transformer_options, cond.nag.crossattn, cond.nag_settings)
        kwargs = {k: cond.extra[k] for k in ("y", "c_size", "c_ar", "guidance") if k in cond.extra}
        with saved_copies() if torch.is_grad_enabled() else contextlib.nullcontext():
            out = self.model.apply_model(
                x, sigma, c_crossattn=cond.crossattn, transformer_options=transformer_options, **kwargs
            )
        return out.to(x.dtype)

    def _by_length(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """A batch of conds padded to one length (masked trailing rows): one call per length with
        the rows alone, as ComfyUI runs conds whose shapes differ (a joint-attention model such as
        Qwen-Image reads every row it is given, and padding or repeating rows would change it)."""
        lengths = cond.mask.bool().sum(dim=1)
        out = torch.empty_like(x)
        for n in lengths.unique().tolist():
            idx = (lengths == n).nonzero().flatten()
            part = cond.index(idx)
            rows = Cond(part.crossattn[:, :n], part.pooled, part.extra)
            out[idx] = self(x[idx], sigma[idx], rows)
        return out


def saved_copies():
    """Autograd keeps its own copy of each activation a backward needs. ComfyUI's models are written for
    inference and may update an activation in place after an op saved it for the backward (its Chroma blocks:
    ``img.addcmul_`` / ``x.addcmul_`` after a LayerNorm), which fails the backward of a tune ("modified by an
    inplace operation"); a copy taken when autograd saves the tensor is not touched by that. Weights and other
    tensors without a ``grad_fn`` are kept as they are (no copy)."""

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone() if t.grad_fn is not None else t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def latent_out(model, x0: torch.Tensor) -> torch.Tensor:
    """``model.process_latent_out(x0)`` (ComfyUI's ``latent_format.process_out``) where a gradient can flow:
    a latent format with tensor statistics (Wan's ``latents_mean`` / ``latents_std``) made them when the
    model was loaded, inside the prompt's inference mode, and autograd cannot save inference tensors.
    Outside inference mode the statistics are read from normal copies of them (the same values), on a
    shallow copy of the format, so ComfyUI's own object is left as it is."""
    fmt = getattr(model, "latent_format", None)
    stats = {}
    if callable(getattr(fmt, "process_out", None)) and not torch.is_inference_mode_enabled():
        stats = {k: v for k, v in vars(fmt).items() if isinstance(v, torch.Tensor) and v.is_inference()}
    if not stats:
        return model.process_latent_out(x0)
    shadow = copy.copy(fmt)
    for k, v in stats.items():
        setattr(shadow, k, v.clone())
    return shadow.process_out(x0)


class ComfyBackend:
    """ReNeg's view of a ComfyUI MODEL (a ModelPatcher) and VAE.

    ``family`` comes from the hidden size of the conditioning the model is used
    with (``hidden``), checked against the UNet's ``context_dim`` where known.
    ``scheduler`` names one of ComfyUI's schedulers (``ddim_uniform`` by default)
    so that a KSampler with sampler ``ddim`` (or ``euler``), that scheduler, the
    same steps, cfg and seed follows the trajectory the tuning scored (ComfyUI scales
    the starting noise by sigma, not sqrt(1 + sigma^2), when a schedule starts below
    sigma_max: 0.26 % apart at 30 ``ddim_uniform`` steps).
    """

    def __init__(
        self,
        patcher,
        vae,
        hidden: int,
        scheduler: str = "ddim_uniform",
        width: int | None = None,
        height: int | None = None,
        patcher_2=None,
        boundary: float | None = None,
    ):
        if not hasattr(patcher, "model") or not hasattr(patcher.model, "apply_model"):
            raise ComfyModelError(
                f"model: expected a ComfyUI MODEL (with model.apply_model), found {type(patcher).__name__}"
            )
        if vae is None or not hasattr(vae, "first_stage_model"):
            raise ComfyModelError(f"vae: expected a ComfyUI VAE (with first_stage_model), found {type(vae).__name__}")
        self.patcher, self.vae = patcher, vae
        self.model = patcher.model
        image_model = self.image_model()
        fam = family_for_model(hidden, image_model)  # the family table decides, as for every front-end
        if fam is None:
            what = f"a {image_model} model" if image_model else "this model"
            raise ComfyModelError(
                f"the conditioning has hidden size {hidden} for {what}; ReNeg's ComfyUI "
                f"nodes support {known_hidden_sizes()} (a shared width on the models ComfyUI tells apart: "
                f"{', '.join(sorted({f.description for f in FAMILIES.values() if f.comfy_image_model}))})"
            )
        if fam.space == "flux":  # a flow model read with guidance and img/txt ids: not sampled here yet
            raise ComfyModelError(
                f"this is a {fam.description} model; ReNeg's ComfyUI sampler does not run Flux yet, so it "
                f"cannot train or tune on it. Train with `reneg train`/`reneg tune` on a diffusers FluxPipeline "
                f"folder; Load ReNeg Embedding gives the result to ComfyUI's Flux"
            )
        ctx = self.context_dim()
        if ctx is not None and ctx != hidden:
            have = family_for_hidden(ctx)
            raise ComfyModelError(
                f"the conditioning is {fam.name} (hidden size {hidden}) but the model "
                f"in use reads {have.name if have else 'hidden size'} ({ctx}): "
                f"connect the text encoder of the same checkpoint"
            )
        self.family = fam.name
        self.scheduler = scheduler
        self.width, self.height = width, height
        self.negative_pooled: torch.Tensor | None = None  # the starting negative's pooled vector
        self.latent_frames = 1  # video models (Wan): latent frames per video
        self.dtype = torch.float32
        self.patcher_2 = None
        if patcher_2 is not None:
            self._second_expert(patcher_2, boundary)
        self._denoiser = ComfyDenoiser(patcher, self.patcher_2, boundary)

    def _second_expert(self, patcher_2, boundary) -> None:
        """Wan 2.2 A14B's low-noise expert beside ``patcher`` (the high-noise one): a Wan MODEL reading the same
        text width, and a boundary in (0, 1) (the release's 0.875), where WanPipeline switches them."""
        if not hasattr(patcher_2, "model") or not hasattr(patcher_2.model, "apply_model"):
            raise ComfyModelError(f"model_low_noise: expected a ComfyUI MODEL, found {type(patcher_2).__name__}")
        if self.family != "wan":
            raise ComfyModelError(f"model_low_noise: a second expert is for Wan 2.2 A14B; this model is {self.family}")
        cfg = getattr(patcher_2.model, "model_config", None)
        other = getattr(cfg, "unet_config", {}).get("image_model") if cfg is not None else None
        if other not in (None, "wan2.1"):
            raise ComfyModelError(f"model_low_noise: a {other} model, not Wan 2.2 A14B's low-noise expert")
        if boundary is None or not 0.0 < float(boundary) < 1.0:
            raise ComfyModelError(f"boundary: expected a flow time between 0 and 1 (A14B: 0.875), got {boundary}")
        self.patcher_2 = patcher_2

    # --- model facts ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        dev = getattr(self.patcher, "load_device", None)
        return torch.device(dev) if dev is not None else torch.device("cpu")

    def image_model(self) -> str | None:
        """ComfyUI's name for a DiT-style model (``pixart_alpha``, ``pixart_sigma``), or None."""
        cfg = getattr(getattr(self.model, "model_config", None), "unet_config", None)
        name = cfg.get("image_model") if isinstance(cfg, dict) else None
        return str(name) if isinstance(name, str) else None

    @property
    def masked(self) -> bool:
        from ..families import get_family

        return get_family(self.family).masked

    @property
    def joint(self) -> bool:
        """The model's text rows join its image tokens in attention (Qwen-Image, Chroma, Flux): conds of different
        lengths are never padded or repeated to batch, as ComfyUI does not batch them either."""
        from ..families import get_family

        return get_family(self.family).joint

    @property
    def flow(self) -> bool:
        """Flow-matching models (the family table says so, or ComfyUI's ``CONST`` model sampling: sigma is
        the flow time t): the sampler starts from the plain noise."""
        from ..families import get_family

        if get_family(self.family).flow:
            return True
        return any(c.__name__ == "CONST" for c in type(self.model_sampling()).__mro__)

    def _rows(self, cond: Cond) -> Cond:
        """A joint-attention model's cond carries a mask of its own rows, so a batch of conds of
        different lengths is padded and masked (:meth:`reneg.cond.Cond.cat`), then run one length
        at a time without the padding (:meth:`ComfyDenoiser._by_length`)."""
        if not self.joint:
            return cond
        t = cond.crossattn
        return Cond(t, cond.pooled, cond.extra, torch.ones(t.shape[:2], dtype=torch.long, device=t.device))

    def context_dim(self) -> int | None:
        cfg = getattr(getattr(self.model, "model_config", None), "unet_config", None)
        ctx = cfg.get("context_dim") if isinstance(cfg, dict) else None
        return int(ctx) if isinstance(ctx, int) else None

    def model_sampling(self):
        get = getattr(self.patcher, "get_model_object", None)
        return get("model_sampling") if get is not None else self.model.model_sampling

    @property
    def denoiser(self) -> ComfyDenoiser:
        return self._denoiser

    @property
    def vae_scale(self) -> int:
        f = getattr(self.vae, "spacial_compression_decode", None)
        return int(f()) if callable(f) else 8

    @property
    def latent_channels(self) -> int:
        fmt = getattr(self.model, "latent_format", None)
        return int(getattr(fmt, "latent_channels", 4))

    @property
    def video(self) -> bool:
        """A video model's latents are ``[B, C, F, h, w]`` (ComfyUI's ``latent_dimensions`` 3: Wan)."""
        fmt = getattr(self.model, "latent_format", None)
        return int(getattr(fmt, "latent_dimensions", 2)) == 3

    @property
    def frames(self) -> int:
        """Frames a video's ``latent_frames`` decode to (the VAE's temporal compression: Wan's 4 k + 1)."""
        if not self.video:
            return 1
        f = getattr(self.vae, "temporal_compression_decode", None)
        t = f() if callable(f) else None
        return (self.latent_frames - 1) * int(t or 1) + 1

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """``[B, C, h, w]``, or ``[B, C, 1, h, w]`` for a model with a video latent format (Qwen-Image's
        Wan 2.1 one, ``latent_dimensions`` 3), which ComfyUI samples as one frame."""
        f = self.vae_scale
        if height % f or width % f:
            raise ComfyModelError(f"width and height must be multiples of {f}, got {width}x{height}")
        if self.video:
            return (batch, self.latent_channels, self.latent_frames, height // f, width // f)
        return (batch, self.latent_channels, height // f, width // f)

    # --- schedule -------------------------------------------------------------------------
    def schedule(self, steps: int) -> torch.Tensor:
        """Sigmas (float64, high to low, ending at 0) from the model's own sigma table (its
        ``model_sampling``)."""
        ms = self.model_sampling()
        try:
            from comfy.samplers import calculate_sigmas
        except ImportError:
            calculate_sigmas = None
        if calculate_sigmas is not None and self.scheduler:
            sig = calculate_sigmas(ms, self.scheduler, steps)
        else:
            sig = uniform_schedule(ms.sigmas, steps)
        sig = torch.as_tensor(sig).detach().double().cpu()
        if sig.dim() != 1 or len(sig) < 2 or not bool(torch.isfinite(sig).all()):
            raise ComfyModelError(f"scheduler {self.scheduler!r} gave no usable sigmas for {steps} steps")
        return sig

    # --- conditioning ---------------------------------------------------------------------
    def _with_size(self, cond: Cond, given: dict | None = None) -> Cond:
        """PixArt: image size and aspect ratio as ComfyUI's PixArt model reads them (``c_size``
        ``[[h, w]]``, ``c_ar`` ``[[h / w]]``): the conditioning's own ``width``/``height`` (from
        CLIPTextEncodePixArtAlpha) where it has them, else the size being made, which is what
        ComfyUI's PixArt falls back to (latent size x 8). Only PixArt-alpha at 1024 px reads them."""
        h = float(self.height or 8 * 128)
        w = float(self.width or 8 * 128)
        given = given or {}
        if isinstance(given.get("width"), (int, float)) and isinstance(given.get("height"), (int, float)):
            h, w = float(given["height"]), float(given["width"])
        ar = float(given["aspect_ratio"]) if isinstance(given.get("aspect_ratio"), (int, float)) else h / w
        dev = self.device
        return Cond(
            cond.crossattn,
            None,
            {"c_size": torch.tensor([[h, w]], device=dev), "c_ar": torch.tensor([[ar]], device=dev)},
        )

    def _chroma(self, cond: Cond) -> Cond:
        """Chroma: its ``guidance`` input 0 (what ComfyUI's Chroma ``extra_conds`` gives), and a mask of
        ones over the rows, so that conds of different lengths batch by padding, which the denoiser
        undoes, one sample at a time (ComfyUI passes Chroma every row of its conditioning, unmasked)."""
        dev = self.device
        n = cond.crossattn.shape[1]
        ones = torch.ones(cond.crossattn.shape[0], n, dtype=torch.long, device=dev)
        return Cond(cond.crossattn, None, {"guidance": torch.zeros(cond.crossattn.shape[0], device=dev)}, ones)

    def _with_adm(self, cond: Cond) -> Cond:
        """SDXL-style models read a pooled vector plus size embeddings (``y``); others read
        neither, so the pooled vector is dropped (positive and negative then always batch).
        PixArt reads its size numbers through ``c_size`` and ``c_ar`` instead; Chroma reads neither."""
        if self.image_model() == "chroma":
            return self._chroma(cond)
        if self.masked and not self.joint:
            return self._with_size(cond)
        if not int(getattr(self.model, "adm_channels", 0) or 0):
            return Cond(cond.crossattn)
        if cond.pooled is None:
            raise ComfyModelError(
                f"this {self.family} model needs a pooled_output in its conditioning and none was given"
            )
        w = self.width or 8 * 128
        h = self.height or 8 * 128
        y = self.model.encode_adm(
            pooled_output=cond.pooled,
            width=w,
            height=h,
            crop_w=0,
            crop_h=0,
            target_width=w,
            target_height=h,
            device=self.device,
        )
        extra = dict(cond.extra)
        extra["y"] = y.to(self.device)
        return Cond(cond.crossattn, cond.pooled, extra)

    def positive_cond(self, conditioning) -> Cond:
        """The positive CONDITIONING as a no-grad Cond on the model's device (normal tensors)."""
        c = conditioning_to_cond(conditioning, "positive")
        c = Cond(
            clone_normal(c.crossattn).float().to(self.device),
            None if c.pooled is None else clone_normal(c.pooled).float().to(self.device),
        )
        if self.masked and not self.joint:
            return self._with_size(c, conditioning[0][1] if isinstance(conditioning[0][1], dict) else None)
        return self._rows(self._with_adm(c))

    def negative_cond(
        self, neg: torch.Tensor, pooled: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> Cond:
        """ComfyUI's conditioning has no attention mask: a T5 negative here is its counted rows only
        (what Load ReNeg Embedding gives), so a mask with padding is refused, not silently dropped."""
        if mask is not None and not bool(mask.bool().all()):
            raise ComfyModelError(
                f"ComfyUI's {self.family} reads every row of its conditioning: give the rows the "
                "attention mask keeps (Load ReNeg Embedding does)"
            )
        pooled = self.negative_pooled if pooled is None else pooled
        return self._rows(self._with_adm(Cond(neg.to(self.device), None if pooled is None else pooled.to(self.device))))

    def encode_prompts(self, prompts: list[str]) -> Cond:
        raise ComfyModelError(
            "the ComfyUI backend takes conditioning from a text encoder node; it does not encode prompts itself"
        )

    def null_embedding(self):
        raise ComfyModelError("the ComfyUI backend starts from the negative CONDITIONING it is given")

    # --- decoding -------------------------------------------------------------------------
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Differentiable: model-space x0 -> VAE latent -> image in [-1, 1], BCHW (a video's frames, ``B * F``), float32, through
        ``model.process_latent_out`` and ``vae.first_stage_model.decode`` (``VAE.decode`` itself may fall
        back to a tiled path decorated with inference mode)."""
        z = latent_out(self.model, x0)
        vae_dtype = getattr(self.vae, "vae_dtype", torch.float32)
        vae_device = getattr(self.vae, "device", x0.device)
        img = self.vae.first_stage_model.decode(z.to(vae_device, vae_dtype))
        if img.dim() == 5:  # a video [B, 3, F, H, W]: its frames as images, for any image reward
            img = img.permute(0, 2, 1, 3, 4).flatten(0, 1)
        return img.float().clamp(-1, 1)

    # --- training context -----------------------------------------------------------------
    def modules(self) -> list[torch.nn.Module]:
        second = self.patcher_2.model if self.patcher_2 is not None else None
        return [m for m in (self.model, second, self.vae.first_stage_model) if isinstance(m, torch.nn.Module)]

    @contextlib.contextmanager
    def trainable(self) -> Iterator["ComfyBackend"]:
        """Grad-enabled, weights as normal tensors, models fully loaded; restores flags on exit.

        A ComfyUI prompt runs under ``torch.inference_mode()``; this is the context in which a gradient
        can flow through the UNet and the VAE: it loads both models fully, turns inference-tensor weights
        into normal tensors (numerically the same; ComfyUI's own LoRA trainer ends with normal tensors
        too), freezes every weight and on exit puts the ``requires_grad`` flags back, drops any ``.grad``
        and empties the device cache."""
        with torch.inference_mode(False), torch.enable_grad():
            self._load_models()
            flags = []
            for m in self.modules():
                normalise_inference_tensors(m)
                for p in m.parameters():
                    flags.append((p, p.requires_grad))
                    p.requires_grad_(False)
            try:
                yield self
            finally:
                for p, flag in flags:
                    p.grad = None
                    p.requires_grad_(flag)
                del flags
                release_memory()

    def _load_models(self) -> None:
        try:
            import comfy.model_management as mm
        except ImportError:
            return
        patchers = [self.patcher] + ([self.patcher_2] if self.patcher_2 is not None else [])
        patchers += [self.vae.patcher] if getattr(self.vae, "patcher", None) else []
        # as ComfyUI's LoRA trainer does: free the device for training and load both models
        # completely (no low-VRAM weight casting in the middle of a backward pass)
        mm.load_models_gpu(patchers, memory_required=1e20, force_full_load=True)


def normalise_inference_tensors(module: torch.nn.Module) -> int:
    """Replace inference-tensor parameters and buffers of ``module`` by normal copies.

    Tensors created under ``torch.inference_mode()`` (ComfyUI loads models inside
    it) can not be saved for backward. One tensor is copied at a time, so the
    extra memory is one tensor's. Returns how many were replaced.
    """
    n = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    n += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    n += 1
    return n


def release_memory() -> None:
    gc.collect()
    try:
        import comfy.model_management as mm
    except ImportError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return
    mm.soft_empty_cache()
