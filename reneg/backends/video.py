"""Video transfer (paper, section 5): SD1.5 -> AnimateDiff and SD2.1 -> ZeroScope.

A negative embedding learned on an image model lives in the output space of its text encoder, which
these video models read unchanged, so the embedding applies to every frame's cross-attention as is.
:func:`load_animatediff` turns a loaded SD1.x backend into a video backend; :func:`load_text_to_video`
loads a ``TextToVideoSDPipeline`` folder (ModelScope, ZeroScope).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..cond import Cond
from ..families import FAMILIES
from .diffusers_backend import DiffusersBackend, DiffusersDenoiser, ModelLoadError
from .parts import family_of, read_json

# AnimateDiff's DDIM schedule, as diffusers' AnimateDiff examples set it: DDIMScheduler(beta_schedule="linear",
# timestep_spacing="linspace", steps_offset=1, clip_sample=False); the motion modules were trained with it
ANIMATEDIFF_SCHEDULER = {
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "timestep_spacing": "linspace",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}


class MotionDenoiser(DiffusersDenoiser):
    """``D(x [B,C,F,h,w], sigma [B], cond [B,L,D]) -> x0``; the cond is repeated per frame (as
    diffusers' ``AnimateDiffPipeline`` does), so the sigma-space DDIM sampler is unchanged."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"video latents must be [B, C, F, h, w], got {list(x.shape)}")
        f = x.shape[2]
        # every field per frame, the NAG negative included
        return super().__call__(x, sigma, cond._map(lambda t: t.repeat_interleave(f, 0)))


@dataclass
class VideoBackend(DiffusersBackend):
    frames: int = 16

    def __post_init__(self):
        super().__post_init__()
        self._motion = MotionDenoiser(
            self.unet, self.alphas_cumprod(), self.scheduler_config.get("prediction_type", "epsilon")
        )

    @property
    def denoiser(self) -> MotionDenoiser:
        return self._motion

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        b, c, h, w = super().latent_shape(batch, height, width)
        return (b, c, self.frames, h, w)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """The ``B * F`` frames as images ``[B*F, 3, H, W]``, so any image reward scores frames
        (``reneg eval``'s ``FrameReward`` averages them per video)."""
        b, c, f, h, w = x0.shape
        return super().decode(x0.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))


def load_animatediff(backend: DiffusersBackend, adapter_dir: str, frames: int = 16) -> VideoBackend:
    """Wrap an SD1.x backend with a local diffusers MotionAdapter folder (e.g.
    ``animatediff-motion-adapter-v1-5-2``): AnimateDiff is an SD1.5 UNet + a motion adapter, with the
    same CLIP-L text encoder. The UNet becomes ``UNetMotionModel.from_unet2d(unet, adapter)``, latents
    are ``[B, C, F, h, w]`` and the schedule is :data:`ANIMATEDIFF_SCHEDULER`."""
    fam = FAMILIES.get(backend.family)
    if fam is None or not fam.motion_adapter:
        raise ModelLoadError(
            f"--video {adapter_dir}: AnimateDiff motion adapters extend SD1.x UNets; "
            f"--model is a {backend.family} model"
        )
    from diffusers import MotionAdapter, UNetMotionModel

    try:
        adapter = MotionAdapter.from_pretrained(adapter_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--video {adapter_dir}: not a loadable MotionAdapter folder: {str(e)[:300]}") from None
    max_len = int(adapter.config.get("motion_max_seq_length", 32))
    if frames > max_len:
        raise ModelLoadError(f"--frames {frames}: the motion adapter {adapter_dir} handles at most {max_len} frames")
    try:
        unet = UNetMotionModel.from_unet2d(backend.unet, adapter)
    except (ValueError, RuntimeError) as e:
        raise ModelLoadError(
            f"--video {adapter_dir}: this motion adapter does not fit the UNet of {backend.source}: {str(e)[:300]}"
        ) from None
    unet = unet.to(device=backend.device, dtype=backend.dtype).eval().requires_grad_(False)
    sched = dict(backend.scheduler_config, **ANIMATEDIFF_SCHEDULER)
    sched.pop("trained_betas", None)
    return VideoBackend(
        unet,
        backend.vae,
        backend.text_encoder,
        backend.tokenizer,
        sched,
        backend.family,
        f"{backend.source} + {os.path.basename(os.path.normpath(adapter_dir))}",
        backend.device,
        backend.dtype,
        frames=frames,
    )


TEXT_TO_VIDEO_PIPELINES = ("TextToVideoSDPipeline",)


@dataclass
class TextToVideoBackend(VideoBackend):
    """A ``TextToVideoSDPipeline`` folder: its own video model, a ``UNet3DConditionModel`` that takes
    ``[B, C, F, h, w]`` latents and one text conditioning per video (it repeats it per frame itself)."""

    @property
    def denoiser(self) -> DiffusersDenoiser:
        return self._denoiser


def is_text_to_video_folder(path: str) -> bool:
    p = os.path.join(os.fspath(path), "model_index.json")
    return os.path.isfile(p) and read_json(p).get("_class_name") in TEXT_TO_VIDEO_PIPELINES


def load_text_to_video(
    path: str, device="cpu", dtype: torch.dtype = torch.float32, frames: int = 16
) -> TextToVideoBackend:
    """Load a local ``TextToVideoSDPipeline`` folder (ZeroScope, ModelScope text-to-video); ``reneg eval``
    recognises one by its ``model_index.json`` (:func:`is_text_to_video_folder`).

    Its text side is SD2.1's: a ``CLIPTextModel`` of width 1024 (OpenCLIP ViT-H/14 converted, as
    SD2.1's), whose ``last_hidden_state`` (final layer norm applied; ``clip_skip=None`` in the
    pipeline's ``encode_prompt``) is what the UNet reads, so an SD2.1 embedding is in its space."""
    need = [
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer",
        "scheduler/scheduler_config.json",
    ]
    missing = [n for n in need if not os.path.exists(os.path.join(path, n))]
    if missing:
        raise ModelLoadError(
            f"{path}: not a complete diffusers TextToVideoSDPipeline folder; missing {', '.join(missing)}"
        )
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = dict(local_files_only=True, torch_dtype=dtype)
    try:
        unet = UNet3DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(f"{path}: could not load the model: {str(e)[:400]}") from None
    family = family_of([text_encoder], unet, path)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False).eval()
    sched = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    backend = TextToVideoBackend(
        unet, vae, text_encoder, tokenizer, dict(sched), family, path, torch.device(device), dtype, frames=frames
    )
    return backend.to(device)
