"""Recognising a single-file checkpoint: which family and variant it is, from its keys and shapes.

Recognition reads only the keys and shapes in the header (see :mod:`.read`), as ComfyUI
(``comfy/model_detection.py``, ``comfy/supported_models.py``) and A1111
(``modules/sd_models_config.py``) do. Flux.1's parts are named (:mod:`.flux`); SD3, Flux, refiners, inpainting UNets, LoRA files, embeddings
and truncated files are refused before anything loads, with one line naming the file and what was found.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from ...families import Family, family_for_hidden
from ..diffusers_backend import ModelLoadError
from .flux import FluxPart, flux_part
from .qwen_image import qwen_image_part
from .chroma import ChromaPart, chroma_part
from .wan import WanPart, wan_part
from .read import UNET, VAE, XL_REFINER_TE, Checkpoint, key_examples, open_checkpoint

IN_CONV = UNET + "input_blocks.0.0.weight"
ADM = UNET + "label_emb.0.0.weight"
# ComfyUI's SD2 v-prediction test reads this tensor: std > 0.09 means the 768-v model
SD2_V_KEY = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_STD = 0.09


@dataclass
class CheckpointInfo:
    path: str
    family: str  # the name of a family with checkpoint_encoders: sd1 | sd2 | sdxl
    architecture: str  # e.g. "Stable Diffusion XL"
    prediction_type: str  # epsilon | v_prediction
    prediction_reason: str
    ztsnr: bool
    has_vae: bool
    dtype: str  # the UNet's storage dtype, e.g. float16
    tensors: int
    parameters: int
    size: int
    native_resolution: int

    def to_json(self) -> dict:
        return asdict(self)


def _refuse_non_checkpoint(ck: Checkpoint) -> None:
    path, keys = ck.path, list(ck.keys())
    if not keys:
        raise ModelLoadError(f"{path}: holds no tensors; expected a Stable Diffusion checkpoint")
    lora = [
        k
        for k in keys
        if any(
            s in k
            for s in (
                "lora_down",
                "lora_up",
                ".lora_A.",
                ".lora_B.",
                "lora_unet_",
                "lora_te",
                ".hada_",
                ".lokr_",
                ".oft_blocks",
            )
        )
    ]
    if lora and 4 * len(lora) >= len(keys):  # LoRA / LyCORIS tensors make up the file
        raise ModelLoadError(
            f"{path}: a LoRA ({len(keys)} tensors such as {key_examples(lora, 1)}), not a model "
            f"checkpoint; ReNeg trains on the base model itself: pass the checkpoint the LoRA "
            f"was made for"
        )
    flux = flux_part(ck)  # before SD3's test: a whole Flux checkpoint keeps its encoders under text_encoders.
    if flux is not None:
        raise ModelLoadError(flux.refusal())
    chroma = chroma_part(ck)  # a Chroma transformer, its T5-XXL or its ae: one part of a model
    if chroma is not None:
        raise ModelLoadError(chroma.refusal())
    wan = wan_part(ck)  # a Wan transformer or its UMT5-XXL
    if wan is not None:
        raise ModelLoadError(wan.refusal())
    if any(k.startswith(("joint_blocks.", UNET + "joint_blocks.")) for k in keys) or any(
        k.startswith("text_encoders.") for k in keys
    ):
        raise ModelLoadError(
            f"{path}: a Stable Diffusion 3 / 3.5 (MMDiT) checkpoint (found 'joint_blocks' keys); "
            f"ReNeg supports SD1.x, SD2.x and SDXL checkpoints"
        )
    if any(k.startswith(("double_blocks.", UNET + "double_blocks.")) for k in keys):
        raise ModelLoadError(
            f"{path}: a Flux checkpoint (found 'double_blocks' keys); ReNeg supports SD1.x, SD2.x and SDXL checkpoints"
        )
    small = len(keys) <= 8 and all(len(s) <= 3 for s in ck.shapes.values())
    if small and any(
        k in ("emb_params", "neg_embedding", "negative_prompt_embeds", "clip_l", "clip_g")
        or k.startswith("string_to_param")
        for k in keys
    ):
        raise ModelLoadError(
            f"{path}: an embedding ({key_examples(keys)}), not a model checkpoint; pass it as "
            f"an embedding (--init, --embedding, --negative) and --model the checkpoint"
        )
    if IN_CONV in ck:
        return
    if any(k.startswith(("x_embedder.", "t_embedder.", UNET + "x_embedder.")) for k in keys):
        raise ModelLoadError(
            f"{path}: a diffusion-transformer checkpoint (found 'x_embedder' keys, e.g. PixArt); "
            f"as a single file ReNeg reads SD1.x, SD2.x and SDXL checkpoints"
        )
    if any(k.startswith("down_blocks.") and ".resnets." in k for k in keys):
        raise ModelLoadError(
            f"{path}: a UNet in the diffusers layout on its own ({key_examples(keys)}); pass the whole "
            f"diffusers folder (with model_index.json) or a full single-file checkpoint"
        )
    if any(k.startswith(("encoder.down.", "decoder.up.", VAE + "decoder.")) for k in keys):
        raise ModelLoadError(f"{path}: a VAE on its own, not a model checkpoint; pass it as --vae beside --model")
    qwen = qwen_image_part(ck)  # a Qwen-Image transformer, text encoder or VAE file
    if qwen is not None:
        raise ModelLoadError(qwen.refusal())
    raise ModelLoadError(
        f"{path}: not a Stable Diffusion checkpoint: no UNet under {UNET!r} "
        f"({len(keys)} tensors such as {key_examples(keys)})"
    )


def _context_dim(ck: Checkpoint) -> int | None:
    for k in sorted(ck.keys()):
        if k.startswith(UNET) and k.endswith("attn2.to_k.weight"):
            return int(ck.shapes[k][1])
    return None


def _prediction(ck: Checkpoint, family: Family, override: str | None) -> tuple[str, str, bool]:
    """``(prediction type, the reason, ztsnr)``. ``--prediction-type`` (``override``) overrides all of
    it; else a ``v_pred`` marker key means v-prediction (``ztsnr`` beside it: a zero-terminal-SNR
    schedule), as ComfyUI reads them; else a safetensors ``modelspec.prediction_type`` (kohya) or
    ``modelspec.predict_key`` (ComfyUI's saver) metadata entry; else, for SD2.x (``v_from_norm_std`` in
    the family table), which carries no marker, ComfyUI's rule: v-prediction (the 768-v model) when the
    standard deviation of ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` is above 0.09 (one
    320-number tensor is read; A1111 instead runs a test forward pass of the whole UNet). Everything
    else predicts noise."""
    ztsnr = "ztsnr" in ck
    if override:
        from ..parts import normalize_prediction_type

        return normalize_prediction_type(override), "--prediction-type", ztsnr
    if "v_pred" in ck:
        return "v_prediction", "the checkpoint's v_pred marker key", ztsnr
    # kohya's scripts write modelspec.prediction_type; ComfyUI's Save Checkpoint writes
    # modelspec.predict_key ("epsilon" or "v", beside a v_pred key for v models)
    for entry in ("modelspec.prediction_type", "modelspec.predict_key"):
        spec = str(ck.metadata.get(entry, "")).strip().lower()
        if spec in ("v", "v_prediction", "v-prediction"):
            return "v_prediction", f"{entry} metadata", ztsnr
        if spec in ("epsilon", "eps"):
            return "epsilon", f"{entry} metadata", ztsnr
    if family.v_from_norm_std and SD2_V_KEY in ck:
        t = ck.tensor(SD2_V_KEY)
        if t.device.type == "meta":
            return "epsilon", "SD2 without tensor data: assumed eps", ztsnr
        std = float(t.float().std(unbiased=False))
        if std > SD2_V_STD:
            return "v_prediction", f"SD2 768-v test: std of norm1.bias {std:.3f} > {SD2_V_STD}", ztsnr
        return "epsilon", f"SD2 768-v test: std of norm1.bias {std:.3f} <= {SD2_V_STD}", ztsnr
    return "epsilon", "no v-prediction marker", ztsnr


def classify(ck: Checkpoint, prediction_type: str | None = None) -> CheckpointInfo:
    """What a checkpoint is, from its keys and shapes, or a one-line refusal naming the file.

    It reads:

    * the UNet's input channels (``input_blocks.0.0.weight``): 4 is text-to-image, 9 an inpainting
      UNet and 8 an instruct-pix2pix UNet (both refused);
    * its cross-attention width (any ``attn2.to_k.weight``): 768 SD1.x, 1024 SD2.x, 2048 SDXL (the
      widths of the family table, :mod:`reneg.families`);
    * SDXL's ADM input (``label_emb.0.0.weight``): the pooled vector (1280) plus six size numbers; a
      refiner has one 1280-wide encoder and an aesthetic score instead (refused);
    * the text encoders' own prefixes (the family table's ``checkpoint_encoders``);
    * the prediction type (:func:`_prediction`).
    """
    path = ck.path
    _refuse_non_checkpoint(ck)
    in_ch = int(ck.shapes[IN_CONV][1])
    if in_ch == 9:
        raise ModelLoadError(
            f"{path}: an inpainting UNet (9 input channels: latent, mask and masked image); "
            f"ReNeg trains text-to-image models (4 input channels)"
        )
    if in_ch == 8:
        raise ModelLoadError(
            f"{path}: an instruct-pix2pix UNet (8 input channels); ReNeg trains text-to-image models (4 input channels)"
        )
    if in_ch != 4:
        raise ModelLoadError(
            f"{path}: a UNet with {in_ch} input channels; ReNeg trains text-to-image models (4 input channels)"
        )
    for k, what in (
        ("edm_mean", "Playground v2.5 (an EDM model)"),
        ("edm_vpred.sigma_max", "an EDM v-prediction model (e.g. CosXL)"),
    ):
        if k in ck:
            raise ModelLoadError(
                f"{path}: {what}, marked by its {k!r} key; ReNeg's sampler reads the DDPM "
                f"schedules of SD1.x, SD2.x and SDXL"
            )
    ctx = _context_dim(ck)
    adm = ck.shapes.get(ADM)
    if ctx is None:
        raise ModelLoadError(
            f"{path}: a UNet without cross-attention (no attn2.to_k.weight under {UNET!r}); "
            f"not a text-to-image Stable Diffusion model"
        )
    if XL_REFINER_TE in {k[: len(XL_REFINER_TE)] for k in ck.keys()} or (adm is not None and ctx == 1280):
        raise ModelLoadError(
            f"{path}: an SDXL refiner (one OpenCLIP bigG encoder, cross-attention {ctx}, "
            f"ADM input {adm[1] if adm else '?'} with an aesthetic score); ReNeg trains base models"
        )
    fam = family_for_hidden(ctx)
    if adm is not None:
        if fam is None or fam.pooled is None:
            raise ModelLoadError(
                f"{path}: a UNet with class/ADM conditioning ({adm[1]} numbers) and cross-attention "
                f"{ctx} (e.g. an SD2 unCLIP or upscaler model); not supported"
            )
        if (adm[1] - fam.pooled) <= 0 or (adm[1] - fam.pooled) % 6:
            raise ModelLoadError(
                f"{path}: an SDXL-like UNet whose ADM input ({adm[1]}) is not the pooled vector "
                f"({fam.pooled}) and six size numbers; not an SDXL base model"
            )
    elif fam is not None and fam.pooled is not None:
        fam = None  # a pooled family's UNet reads the pooled vector through its ADM input
    if fam is None or not fam.checkpoint_encoders:
        raise ModelLoadError(
            f"{path}: a UNet with cross-attention width {ctx}; single files of SD1.x (768), "
            f"SD2.x (1024) and SDXL (2048) are supported"
        )
    need = {p: f"{name} ({p})" for p, name in fam.checkpoint_encoders}
    prefixes = {k[: len(p)] for k in ck.keys() for p in need if k.startswith(p)}
    missing = [v for p, v in need.items() if p not in prefixes]
    if missing:
        raise ModelLoadError(
            f"{path}: a {fam.description} UNet without its text encoder "
            f"{' and '.join(missing)}; ReNeg needs a full checkpoint (UNet, text encoders; the VAE "
            f"may come from --vae)"
        )
    pt, reason, ztsnr = _prediction(ck, fam, prediction_type)
    unet_dtypes: dict = {}
    for k, d in ck.dtypes.items():
        if k.startswith(UNET):
            unet_dtypes[d] = unet_dtypes.get(d, 0) + 1
    dtype = max(unet_dtypes, key=unet_dtypes.get) if unet_dtypes else torch.float32
    params = 0
    for s in ck.shapes.values():
        n = 1
        for d in s:
            n *= d
        params += n
    resolution = fam.native_resolution
    if pt == "v_prediction" and fam.v_native_resolution:
        resolution = fam.v_native_resolution
    return CheckpointInfo(
        path=path,
        family=fam.name,
        architecture=fam.description,
        prediction_type=pt,
        prediction_reason=reason,
        ztsnr=ztsnr,
        has_vae=(VAE + "decoder.conv_out.weight") in ck,
        dtype=str(dtype).replace("torch.", ""),
        tensors=len(ck.shapes),
        parameters=params,
        size=os.path.getsize(path) if os.path.isfile(path) else 0,
        native_resolution=resolution,
    )


def inspect_checkpoint(
    path: str, prediction_type: str | None = None
) -> CheckpointInfo | FluxPart | ChromaPart | WanPart:
    """Describe a checkpoint from its header alone (no weights are read, except ComfyUI's one small
    SD2 tensor when no marker decides the prediction type). One part of a flow model is named as such:
    Flux.1 (transformer, clip_l, t5xxl, ae, or all four in one file; :mod:`.flux`), Chroma (transformer,
    T5-XXL, ae; :mod:`.chroma`), Wan (transformer, UMT5-XXL; :mod:`.wan`)."""
    ck = open_checkpoint(path, meta=False)
    # Flux names the shared t5xxl and ae
    return flux_part(ck) or chroma_part(ck) or wan_part(ck) or classify(ck, prediction_type)


def describe(info: CheckpointInfo | FluxPart | ChromaPart | WanPart) -> list[str]:
    """Lines for ``reneg inspect``."""
    if isinstance(info, (FluxPart, ChromaPart, WanPart)):
        return info.describe()
    pt = "v-prediction" if info.prediction_type == "v_prediction" else "eps (noise) prediction"
    size = info.size / 2**30
    return [
        info.path,
        f"  architecture  {info.architecture} ({info.family}), {info.native_resolution} px native",
        f"  prediction    {pt} ({info.prediction_reason})" + (", zero-terminal-SNR (ztsnr)" if info.ztsnr else ""),
        f"  weights       {info.dtype}, {info.parameters / 1e9:.2f} B numbers in {info.tensors} tensors, "
        f"{size:.2f} GiB",
        f"  VAE inside    {'yes' if info.has_vae else 'no (pass --vae FILE|FOLDER)'}",
    ]
