"""Loading a user's model files into a :class:`DiffusersBackend`, locally: a diffusers folder or a
single-file checkpoint as the UIs keep them (:func:`load_diffusers`). Nothing is ever downloaded.

Folder kinds are rows of ``FOLDER_KINDS``: a new architecture adds a row (a test on the folder's
``model_index.json`` and a loader) without touching the others.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch

from .diffusers_backend import DiffusersBackend, ModelLoadError
from .parts import assemble, family_of, is_sdxl_folder, normalize_prediction_type, read_json  # noqa: F401
from .single_file import load_vae


def weights_dtype(mixed_precision: str, device: str | torch.device) -> torch.dtype:
    """The models' weights dtype for ``--mixed-precision``. Off the GPU only bf16 is kept (CPUs run
    bf16 matmuls and convolutions natively; it halves the memory of an SDXL checkpoint); fp16 is fp32."""
    if torch.device(device).type != "cuda":
        return torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def load_diffusers(
    path: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: str | None = None,
    vae: str | None = None,
    prediction_type: str | None = None,
    frames: int | None = None,
    text_encoders: list[str] | tuple = (),
    tokenizer: str | None = None,
    low_noise_model: str | None = None,
) -> DiffusersBackend:
    """Load SD1.x / SD2.x / SDXL from a diffusers folder or a single-file checkpoint, locally.

    A diffusers folder is ``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/``, ``scheduler/``, and for SDXL also ``text_encoder_2/`` and ``tokenizer_2/`` (or another
    row of ``FOLDER_KINDS``); a single file is ``.safetensors``, or ``.ckpt``/``.pt`` read through
    ``weights_only=True``, which :mod:`reneg.backends.single_file` recognises from its own keys and
    shapes. The family a model belongs to (which embeddings fit it) comes from the family table in
    :mod:`reneg.families`: the hidden sizes of its text encoders, the UNet's cross-attention width and,
    for two-encoder models, the pooled vector's size (:func:`reneg.backends.parts.family_of`).

    ``config``: optional diffusers folder whose configs replace the built-in ones for a single
    file; ``vae``: a VAE file or folder replacing the model's own; ``prediction_type``: ``eps``
    or ``v`` instead of what the files say; ``frames``: frames per video, which also lets a video
    model's folder load (see :func:`makes_videos`). A Flux.1 or Chroma transformer file, as ComfyUI keeps
    it, loads with its parts: ``text_encoders`` (Flux: clip_l and t5xxl; Chroma: t5xxl), ``vae`` (ae) and
    ``tokenizer`` (T5's; ComfyUI's own when the files sit in a ComfyUI folder):
    :func:`reneg.backends.single_file.flux.load_flux_files`, :func:`reneg.backends.single_file.chroma.load_chroma_files`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if low_noise_model:
            raise ModelLoadError(f"--low-noise-model: for Wan 2.2 A14B's files; a folder {path} holds its own "
                                 "transformer_2/")  # fmt: skip
        backend = _load_folder(path, device, dtype, vae, frames)
    elif os.path.isfile(path):
        from .single_file import load_single_file, open_checkpoint
        from .single_file.chroma import chroma_part, load_chroma_files
        from .single_file.flux import flux_part, load_flux_files
        from .single_file.qwen_image import load_qwen_image_files, qwen_image_part
        from .single_file.wan import load_wan_files, wan_part

        if path.lower().endswith(".safetensors"):  # the transformer files that load with their parts
            ck = open_checkpoint(path)
            part = flux_part(ck)
            if part is not None and part.part in ("transformer", "checkpoint"):
                return load_flux_files(path, text_encoders, vae, tokenizer, device, dtype)
            chroma = chroma_part(ck)
            if chroma is not None and chroma.kind == "transformer" and chroma.family == "chroma":
                return load_chroma_files(path, text_encoders, vae, tokenizer, device, dtype)
            qwen = qwen_image_part(ck)
            if qwen is not None and qwen.part == "transformer":
                return load_qwen_image_files(path, text_encoders, vae, tokenizer, device, dtype)
            wan = wan_part(ck)
            if wan is not None and wan.part == "transformer" and wan.supported:
                return load_wan_files(path, text_encoders, vae, tokenizer, device, dtype, frames, low_noise_model)
        if low_noise_model:
            raise ModelLoadError(f"--low-noise-model: only for Wan 2.2 A14B's high-noise transformer file as --model; "
                                 f"{path} is not one")  # fmt: skip
        if text_encoders or tokenizer:
            flag = "--text-encoder" if text_encoders else "--tokenizer"
            raise ModelLoadError(f"{flag}: only for a model kept as separate files (a Flux.1, Chroma, Qwen-Image or Wan transformer file); "
                                 f"{path} holds its own text encoders")  # fmt: skip
        backend = load_single_file(path, device, dtype, config=config, vae=vae, prediction_type=prediction_type)
        return backend
    else:
        raise ModelLoadError(
            f"{path}: no such model folder or file (give a local diffusers folder "
            f"with model_index.json, or a .safetensors checkpoint)"
        )
    if prediction_type:
        backend.set_prediction_type(normalize_prediction_type(prediction_type), "--prediction-type")
    return backend


def model_files(opts) -> dict:
    """The keyword arguments of :func:`load_diffusers` besides the model path that a front-end's options
    carry (``--config``, ``--vae``, ``--prediction-type``, ``--text-encoder``, ``--tokenizer``,
    ``--low-noise-model``)."""
    return {
        "config": getattr(opts, "config", None),
        "vae": getattr(opts, "vae", None),
        "prediction_type": getattr(opts, "prediction_type", None),
        "text_encoders": getattr(opts, "text_encoders", None) or (),
        "tokenizer": getattr(opts, "tokenizer", None),
        "low_noise_model": getattr(opts, "low_noise_model", None),
    }


class FolderKind(NamedTuple):
    """A row of ``FOLDER_KINDS``. A video model's folder (ZeroScope's ``TextToVideoSDPipeline``) is a row
    marked ``video``: it is loaded where the caller asks for ``frames`` (``reneg eval``) and passed over
    otherwise, as if the row were absent."""

    name: str
    matches: Callable[[str, dict], bool]  # (folder, model_index) -> is this kind
    load: Callable  # (folder, device, dtype, vae) -> backend; a video kind also takes frames
    video: bool = False  # the model makes videos: loaded only where frames are asked for
    # a video kind that also loads where no frames are asked for, as one frame per video (Wan: image mode)
    single_frame: bool = False


def _load_sd_folder(path: str, device, dtype, vae_path: str | None = None) -> DiffusersBackend:
    sdxl = is_sdxl_folder(path)
    need = [
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer",
        "scheduler/scheduler_config.json",
    ]
    if sdxl:
        need += ["text_encoder_2/config.json", "tokenizer_2"]
    if vae_path:
        need.remove("vae/config.json")
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
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        if sdxl:
            te2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw)
            tok2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
        vae = None if vae_path else AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(f"{path}: could not load the model: {str(e)[:400]}") from None
    if vae_path:
        own = os.path.join(path, "vae", "config.json")
        vae = load_vae(vae_path, dtype, read_json(own) if os.path.isfile(own) else None)
    sched = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    backend = assemble(unet, vae, text_encoder, tokenizer, sched, path, device, dtype, te2, tok2)
    backend.model_info = {
        "source": path,
        "kind": "diffusers folder",
        "family": backend.family,
        "prediction_type": backend.prediction_type,
        "prediction_reason": "scheduler/scheduler_config.json",
        "vae": vae_path or "inside",
    }
    return backend


def _is_pixart(path: str, index: dict) -> bool:
    from .pixart import pixart_family  # imported when a folder is looked at, not with this module

    return pixart_family(index) is not None


def _load_pixart(path: str, device, dtype, vae: str | None = None) -> DiffusersBackend:
    from .pixart import load_folder  # PixArt-alpha / -sigma: T5 with its attention mask, a transformer

    if vae:
        raise ModelLoadError(f"{path}: --vae is for Stable Diffusion checkpoints; a PixArt folder uses its own vae/")
    return load_folder(path, device, dtype)


def _is_flux(path: str, index: dict) -> bool:
    from .flux import is_flux_index

    return is_flux_index(index)


def _load_flux(path: str, device, dtype, vae: str | None = None) -> DiffusersBackend:
    from .flux import load_folder  # Flux.1 dev / schnell: T5 rows + CLIP's pooled vector, a flow transformer

    if vae:
        raise ModelLoadError(f"{path}: --vae is for Stable Diffusion checkpoints; a Flux folder uses its own vae/")
    return load_folder(path, device, dtype)


def _is_chroma(path: str, index: dict) -> bool:
    return index.get("_class_name") == "ChromaPipeline"


def _load_chroma(path: str, device, dtype, vae: str | None = None) -> DiffusersBackend:
    from .chroma import load_folder  # Chroma: T5 with its attention mask, a flow-matching transformer

    if vae:
        raise ModelLoadError(f"{path}: --vae is for Stable Diffusion checkpoints; a Chroma folder uses its own vae/")
    return load_folder(path, device, dtype)


def _load_qwen_image(path: str, device, dtype, vae: str | None = None) -> DiffusersBackend:
    from .qwen_image import load_folder  # Qwen-Image: Qwen2.5-VL rows with a mask, a flow-matching MMDiT

    if vae:
        raise ModelLoadError(
            f"{path}: --vae is for Stable Diffusion checkpoints; a Qwen-Image folder uses its own vae/"
        )
    return load_folder(path, device, dtype)


def _is_text_to_video(path: str, index: dict) -> bool:
    from .video import TEXT_TO_VIDEO_PIPELINES

    return index.get("_class_name") in TEXT_TO_VIDEO_PIPELINES


def _load_text_to_video(path: str, device, dtype, vae: str | None = None, frames: int = 16) -> DiffusersBackend:
    from .video import load_text_to_video  # ZeroScope / ModelScope: a 3-D UNet, SD2.1's text side

    if vae:
        raise ModelLoadError(
            f"{path}: --vae is for Stable Diffusion checkpoints; a text-to-video folder uses its own vae/"
        )
    return load_text_to_video(path, device, dtype=dtype, frames=frames)


def _is_wan(path: str, index: dict) -> bool:
    from .wan import wan_kind

    return wan_kind(index) is not None


def _load_wan(path: str, device, dtype, vae: str | None = None, frames: int | None = None) -> DiffusersBackend:
    from .wan import load_folder  # Wan 2.1 / 2.2: UMT5 rows, a flow-matching video transformer (two for A14B)

    if vae:
        raise ModelLoadError(f"{path}: --vae is for Stable Diffusion checkpoints; a Wan folder uses its own vae/")
    return load_folder(path, device, dtype, frames)


FOLDER_KINDS: list[FolderKind] = [
    FolderKind("pixart", _is_pixart, _load_pixart),
    FolderKind("wan", _is_wan, _load_wan, video=True, single_frame=True),
    FolderKind("flux", _is_flux, _load_flux),
    FolderKind("chroma", _is_chroma, _load_chroma),
    FolderKind("qwen-image", lambda path, index: index.get("_class_name") == "QwenImagePipeline", _load_qwen_image),
    FolderKind("text-to-video", _is_text_to_video, _load_text_to_video, video=True),
    FolderKind("stable-diffusion", lambda path, index: os.path.isdir(os.path.join(path, "unet")), _load_sd_folder),
]


def apply_model_options(
    backend, wan_experts: str = "shared", guidance_2: float | None = None, shift: float | None = None
):
    """``--wan-experts`` and ``--guidance-2`` (Wan 2.2 A14B's settings) and ``--shift`` (Wan's flow shift) on a
    loaded model, refused with a reason on any other model. Returns the backend."""
    set_experts = getattr(backend, "set_experts", None)
    if set_experts is None:
        if shift is not None:
            raise ModelLoadError(
                f"--shift: for Wan's fixed flow shift; {backend.source} is a {backend.family} model, which keeps "
                "its own schedule"
            )
        given = [f for f, v in (("--wan-experts", wan_experts != "shared"), ("--guidance-2", guidance_2)) if v]
        if given:
            raise ModelLoadError(
                f"{' and '.join(given)}: for Wan 2.2 A14B's two experts; {backend.source} is a {backend.family} model"
            )
        return backend
    if shift is not None:  # the shift ComfyUI's ModelSamplingSD3 sets: sigma = s t / (1 + (s - 1) t)
        backend.scheduler_config = dict(backend.scheduler_config, flow_shift=float(shift))
    if guidance_2 is not None and backend.experts != 2:
        raise ModelLoadError(
            f"--guidance-2: {backend.source} has one transformer; the low-noise expert's own guidance is Wan 2.2 A14B's"
        )
    set_experts(wan_experts)
    backend.denoiser.guidance_2 = guidance_2
    return backend


def load_run_model(opts, device, dtype):
    """The model of a ``reneg train`` / ``reneg tune`` run as its options say: ``--model`` with its files
    (:func:`model_files`), ``--frames`` (clips: a text-to-video model only), then ``--wan-experts``,
    ``--guidance-2`` and ``--shift`` (:func:`apply_model_options`)."""
    frames = getattr(opts, "frames", 1)
    path = opts.model
    backend = load_diffusers(path, device=device, dtype=dtype, frames=clip_frames(path, frames), **model_files(opts))
    check_clip_frames(backend, frames)
    return apply_model_options(
        backend, getattr(opts, "wan_experts", "shared"), getattr(opts, "guidance_2", None), getattr(opts, "shift", None)
    )


def clip_frames(path: str, frames: int | None, flag: str = "--frames") -> int | None:
    """What :func:`load_diffusers` is given for ``--frames`` in train and tune: None for image mode (1), so
    that only a text-to-video model is asked for clips. A model that makes clips only (ZeroScope's
    ``TextToVideoSDPipeline``; Wan also makes single frames) asks for ``flag`` by name."""
    if frames and int(frames) > 1:
        return int(frames)
    path = os.fspath(path)
    if os.path.isdir(path):
        index = _model_index(path)
        for kind in FOLDER_KINDS:
            if kind.video and not kind.single_frame and kind.matches(path, index):
                raise ModelLoadError(
                    f"{path}: a text-to-video model ({index.get('_class_name') or kind.name}) makes clips, not "
                    f"single images: give {flag} N (its frames per clip, e.g. 16) to train or tune on its clips"
                )
    return None


def check_clip_frames(backend, frames: int | None, flag: str = "--frames"):
    """A run asked for clips (``frames`` above 1) needs a model that makes them: anything else is refused
    with a reason naming the model. Returns the backend."""
    if frames and int(frames) > 1 and getattr(backend, "frames", 1) != int(frames):
        raise ModelLoadError(
            f"{flag} {frames}: {backend.source} is a {backend.family} model, which makes images; clips are for "
            f"a text-to-video model (Wan, ZeroScope). Leave {flag} at 1"
        )
    return backend


VIDEO_FRAMES = 16  # reneg eval's frames per video by default (AnimateDiff, ZeroScope)
WAN_FRAMES = 81  # Wan's own default length (its configs' frame_num, WanPipeline's num_frames)


def default_frames(path: str) -> int:
    """Frames per video when ``reneg eval`` is not given ``--frames``: Wan's 81 for a Wan folder or
    transformer file, else 16."""
    path = os.fspath(path)
    if os.path.isdir(path) and _is_wan(path, _model_index(path)):
        return WAN_FRAMES
    if os.path.isfile(path) and makes_videos(path):  # a file that makes videos is a Wan transformer
        return WAN_FRAMES
    return VIDEO_FRAMES


def _model_index(path: str) -> dict:
    p = os.path.join(path, "model_index.json")
    return read_json(p) if os.path.isfile(p) else {}


def makes_videos(path: str) -> bool:
    """Whether ``path`` is a folder of a video kind (a ``TextToVideoSDPipeline``): a model that makes
    videos by itself, which :func:`load_diffusers` loads when it is given ``frames``."""
    path = os.fspath(path)
    if os.path.isfile(path) and path.lower().endswith(".safetensors"):  # a Wan text-to-video transformer file
        from .single_file import open_checkpoint
        from .single_file.wan import wan_part

        part = wan_part(open_checkpoint(path))
        return part is not None and part.part == "transformer" and part.supported
    if not os.path.isdir(path):
        return False
    index = _model_index(path)
    return any(kind.video and kind.matches(path, index) for kind in FOLDER_KINDS)


def _load_folder(path: str, device, dtype, vae: str | None = None, frames: int | None = None) -> DiffusersBackend:
    index = _model_index(path)
    for kind in FOLDER_KINDS:
        if kind.video and frames is None and not kind.single_frame:
            continue  # a video model loads only where videos are made
        if kind.matches(path, index):
            if kind.video:
                return kind.load(path, device, dtype, vae, frames)
            return kind.load(path, device, dtype, vae)
    return _load_sd_folder(path, device, dtype, vae)  # says which parts are missing
