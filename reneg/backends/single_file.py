"""Single-file checkpoints as the UIs keep them: recognise, describe, load. Nothing is downloaded.

A checkpoint in the original (LDM) layout holds the UNet under
``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the text
encoders under ``cond_stage_model.transformer.`` (SD1.x: CLIP ViT-L/14 in the
transformers layout), ``cond_stage_model.model.`` (SD2.x: OpenCLIP ViT-H/14 in the
open_clip layout) or ``conditioner.embedders.0.transformer.`` +
``conditioner.embedders.1.model.`` (SDXL: CLIP-L and OpenCLIP ViT-bigG/14).

Recognition reads only the keys and shapes in the safetensors header (a pickle is
opened memory-mapped with ``weights_only=True``), as ComfyUI
(``comfy/model_detection.py``, ``comfy/supported_models.py``) and A1111
(``modules/sd_models_config.py``) do:

* the UNet's input channels (``input_blocks.0.0.weight``): 4 is text-to-image, 9 an
  inpainting UNet and 8 an instruct-pix2pix UNet (both refused);
* its cross-attention width (any ``attn2.to_k.weight``): 768 SD1.x, 1024 SD2.x, 2048 SDXL
  (the widths of the family table, :mod:`reneg.families`);
* SDXL's ADM input (``label_emb.0.0.weight``): the pooled vector (1280) plus six size
  numbers; a refiner has one 1280-wide encoder and an aesthetic score instead (refused);
* the text encoders' own prefixes;
* prediction type: a ``v_pred`` marker key means v-prediction (``ztsnr`` beside it: a
  zero-terminal-SNR schedule), as ComfyUI reads them; else a safetensors
  ``modelspec.prediction_type`` (kohya) or ``modelspec.predict_key`` (ComfyUI's saver) metadata entry; else, for SD2.x, which carries no marker,
  ComfyUI's rule: v-prediction (the 768-v model) when the standard deviation of
  ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` is above 0.09 (one 320-number
  tensor is read; A1111 instead runs a test forward pass of the whole UNet). Everything
  else predicts noise. ``--prediction-type`` overrides all of it.

SD3, Flux, refiners, inpainting UNets, LoRA files, embeddings and truncated files
are refused before anything loads, with one line naming the file and what was found.

Loading builds the diffusers modules from the configurations in
:mod:`reneg.backends.configs` (or a diffusers folder given as ``config``) and fills
them with the checkpoint's tensors, renamed by diffusers' own single-file conversion
functions (``diffusers.loaders.single_file_utils``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import tempfile
from dataclasses import asdict, dataclass

import torch

from ..families import FAMILIES, family_for_hidden
from ..fileio import SAFETENSORS_DTYPES, read_safetensors_header
from .diffusers_backend import DiffusersBackend, ModelLoadError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TE = "cond_stage_model.transformer."
SD2_TE = "cond_stage_model.model."
XL_TE1 = "conditioner.embedders.0.transformer."
XL_TE2 = "conditioner.embedders.1.model."
XL_REFINER_TE = "conditioner.embedders.0.model."

IN_CONV = UNET + "input_blocks.0.0.weight"
ADM = UNET + "label_emb.0.0.weight"
# ComfyUI's SD2 v-prediction test reads this tensor: std > 0.09 means the 768-v model
SD2_V_KEY = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_STD = 0.09

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# --- reading a file's keys and shapes ------------------------------------------------------------


class Checkpoint:
    """The keys, shapes and dtypes of a checkpoint, and a reader for one tensor at a time.

    ``shapes``/``dtypes`` come from the safetensors header (or a memory-mapped pickle); tensors
    are read only when a loader asks for them. ``meta=True`` gives shape-only tensors on the
    meta device, so the whole loading path runs on a header without reading any data."""

    def __init__(
        self,
        path: str,
        shapes: dict,
        dtypes: dict,
        metadata: dict | None = None,
        reader=None,
        kind: str = "safetensors",
    ):
        self.path, self.shapes, self.dtypes = path, shapes, dtypes
        self.metadata = dict(metadata or {})
        self.kind = kind
        self._reader = reader

    def __contains__(self, key) -> bool:
        return key in self.shapes

    def keys(self):
        return self.shapes.keys()

    def tensor(self, key: str) -> torch.Tensor:
        if self._reader is None:
            return torch.empty(self.shapes[key], dtype=self.dtypes[key], device="meta")
        return self._reader(key)

    def subset(self, prefix: str, dtype: torch.dtype | None = None) -> dict:
        """Every tensor under ``prefix`` (names kept), floats cast to ``dtype`` one at a time."""
        out = {}
        for k in self.shapes:
            if k.startswith(prefix):
                t = self.tensor(k)
                out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    @classmethod
    def from_header(cls, path: str, header: dict, meta: bool = True) -> "Checkpoint":
        shapes, dtypes = {}, {}
        for k, v in header.items():
            if k == "__metadata__":
                continue
            shapes[k] = tuple(v["shape"])
            dtypes[k] = _torch_dtype(v["dtype"])
        return cls(path, shapes, dtypes, header.get("__metadata__") or {}, None if meta else _st_reader(path))


def _st_reader(path: str):
    from safetensors import safe_open

    handle = {}

    def read(key: str) -> torch.Tensor:
        if "f" not in handle:
            handle["f"] = safe_open(path, framework="pt", device="cpu")
        return handle["f"].get_tensor(key)

    return read


def _torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (float32 for one this torch lacks)."""
    entry = SAFETENSORS_DTYPES.get(name)
    return getattr(torch, entry[1], torch.float32) if entry else torch.float32


def _safetensors_header(path: str) -> dict:
    """The checked header, with a truncated file named as such (its header promises more bytes than are there)."""
    try:
        return read_safetensors_header(path, name_truncation=True)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def open_checkpoint(path: str, meta: bool = False) -> Checkpoint:
    """Keys, shapes and dtypes of a ``.safetensors`` file from its header (no tensor read), or of a
    ``.ckpt``/``.pt`` pickle loaded memory-mapped with ``weights_only=True``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(8)
    pickle = magic[:4] == b"PK\x03\x04" or magic[:1] == b"\x80"
    if not pickle:
        if not path.lower().endswith(".safetensors") and len(magic) == 8:
            (n,) = struct.unpack("<Q", magic)
            if n > os.path.getsize(path):
                raise ModelLoadError(
                    f"{path}: not a checkpoint: expected a .safetensors file or a .ckpt/.pt pickle (zip) file"
                )
        return Checkpoint.from_header(path, _safetensors_header(path), meta=meta)
    obj = _load_pickle(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(
            f"{path}: expected a checkpoint (a dict of tensors, or one under 'state_dict'), found {type(obj).__name__}"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    ck = Checkpoint(
        path,
        {k: tuple(v.shape) for k, v in tensors.items()},
        {k: v.dtype for k, v in tensors.items()},
        {},
        None if meta else tensors.__getitem__,
        "pickle",
    )
    return ck


def _load_pickle(path: str):
    import warnings

    from ..fileio import safe_torch_load

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - the plain loader below says what is wrong, naming the file
        pass
    try:
        return safe_torch_load(path, what="checkpoint")
    except (ValueError, OSError) as e:
        raise ModelLoadError(str(e)) from None


# --- recognising what a file is ------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    path: str
    family: str  # sd1 | sd2 | sdxl
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


def _example(keys, n=2) -> str:
    keys = sorted(keys)
    return ", ".join(repr(k) for k in keys[:n]) + (", ..." if len(keys) > n else "")


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
            f"{path}: a LoRA ({len(keys)} tensors such as {_example(lora, 1)}), not a model "
            f"checkpoint; ReNeg trains on the base model itself: pass the checkpoint the LoRA "
            f"was made for"
        )
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
            f"{path}: an embedding ({_example(keys)}), not a model checkpoint; pass it as "
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
            f"{path}: a UNet in the diffusers layout on its own ({_example(keys)}); pass the whole "
            f"diffusers folder (with model_index.json) or a full single-file checkpoint"
        )
    if any(k.startswith(("encoder.down.", "decoder.up.", VAE + "decoder.")) for k in keys):
        raise ModelLoadError(f"{path}: a VAE on its own, not a model checkpoint; pass it as --vae beside --model")
    raise ModelLoadError(
        f"{path}: not a Stable Diffusion checkpoint: no UNet under {UNET!r} "
        f"({len(keys)} tensors such as {_example(keys)})"
    )


def _context_dim(ck: Checkpoint) -> int | None:
    for k in sorted(ck.keys()):
        if k.startswith(UNET) and k.endswith("attn2.to_k.weight"):
            return int(ck.shapes[k][1])
    return None


def _prediction(ck: Checkpoint, family: str, override: str | None) -> tuple[str, str, bool]:
    ztsnr = "ztsnr" in ck
    if override:
        from .parts import normalize_prediction_type

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
    if family == "sd2" and SD2_V_KEY in ck:
        t = ck.tensor(SD2_V_KEY)
        if t.device.type == "meta":
            return "epsilon", "SD2 without tensor data: assumed eps", ztsnr
        std = float(t.float().std(unbiased=False))
        if std > SD2_V_STD:
            return "v_prediction", f"SD2 768-v test: std of norm1.bias {std:.3f} > {SD2_V_STD}", ztsnr
        return "epsilon", f"SD2 768-v test: std of norm1.bias {std:.3f} <= {SD2_V_STD}", ztsnr
    return "epsilon", "no v-prediction marker", ztsnr


def classify(ck: Checkpoint, prediction_type: str | None = None) -> CheckpointInfo:
    """What a checkpoint is, from its keys and shapes, or a one-line refusal naming the file."""
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
    fam = fam.name if fam is not None else None
    if adm is not None:
        sdxl = FAMILIES["sdxl"]
        if fam != "sdxl":
            raise ModelLoadError(
                f"{path}: a UNet with class/ADM conditioning ({adm[1]} numbers) and cross-attention "
                f"{ctx} (e.g. an SD2 unCLIP or upscaler model); not supported"
            )
        if (adm[1] - sdxl.pooled) <= 0 or (adm[1] - sdxl.pooled) % 6:
            raise ModelLoadError(
                f"{path}: an SDXL-like UNet whose ADM input ({adm[1]}) is not the pooled vector "
                f"({sdxl.pooled}) and six size numbers; not an SDXL base model"
            )
        need = {
            XL_TE1: "CLIP-L (conditioner.embedders.0.transformer.)",
            XL_TE2: "OpenCLIP bigG (conditioner.embedders.1.model.)",
        }
    elif fam == "sd1":
        need = {SD1_TE: "CLIP-L (cond_stage_model.transformer.)"}
    elif fam == "sd2":
        need = {SD2_TE: "OpenCLIP-H (cond_stage_model.model.)"}
    else:
        raise ModelLoadError(
            f"{path}: a UNet with cross-attention width {ctx}; single files of SD1.x (768), "
            f"SD2.x (1024) and SDXL (2048) are supported"
        )
    prefixes = {k[: len(p)] for k in ck.keys() for p in need if k.startswith(p)}
    missing = [v for p, v in need.items() if p not in prefixes]
    if missing:
        raise ModelLoadError(
            f"{path}: a {FAMILIES[fam].description} UNet without its text encoder "
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
    sample = {"sdxl": 128}.get(fam, 96 if (fam == "sd2" and pt == "v_prediction") else 64)
    return CheckpointInfo(
        path=path,
        family=fam,
        architecture=FAMILIES[fam].description,
        prediction_type=pt,
        prediction_reason=reason,
        ztsnr=ztsnr,
        has_vae=(VAE + "decoder.conv_out.weight") in ck,
        dtype=str(dtype).replace("torch.", ""),
        tensors=len(ck.shapes),
        parameters=params,
        size=os.path.getsize(path) if os.path.isfile(path) else 0,
        native_resolution=sample * 8,
    )


def inspect_checkpoint(path: str, prediction_type: str | None = None) -> CheckpointInfo:
    """Describe a checkpoint from its header alone (no weights are read, except ComfyUI's one small
    SD2 tensor when no marker decides the prediction type)."""
    return classify(open_checkpoint(path, meta=False), prediction_type)


def looks_like_checkpoint(path: str) -> bool:
    """A file with a UNet, text encoder or VAE prefix in it, or too large to be an embedding."""
    try:
        ck = open_checkpoint(path, meta=True)
    except ModelLoadError:
        return os.path.getsize(path) > 512 * 1024 * 1024
    prefixes = (UNET, VAE, "cond_stage_model.", "conditioner.", "lora_", "double_blocks.", "joint_blocks.")
    return len(ck.shapes) > 16 or any(k.startswith(prefixes) for k in ck.keys())


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of the whole file; its first 10 hex digits are A1111's "model hash" (autov2)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# --- building diffusers modules from the tensors ---------------------------------------------------


def _empty_weights():
    try:
        from accelerate import init_empty_weights
    except ImportError:  # without accelerate: the modules are made with random weights first
        return contextlib.nullcontext()
    return init_empty_weights()


def _fill(model, sd: dict, source: str, part: str, optional=("position_ids", "logit_scale")):
    """Put ``sd`` into ``model`` (strict on what the model needs; names with or without the
    ``text_model.`` prefix are matched to the model's)."""
    want = model.state_dict()
    out, extra = {}, []
    for k, v in sd.items():
        if k in want:
            out[k] = v
        elif "text_model." + k in want:
            out["text_model." + k] = v
        elif k.removeprefix("text_model.") in want:
            out[k.removeprefix("text_model.")] = v
        elif not k.endswith(optional):
            extra.append(k)
    missing = [k for k in want if k not in out]
    bad = [
        f"{k} {tuple(out[k].shape)} (expected {tuple(want[k].shape)})"
        for k in out
        if tuple(out[k].shape) != tuple(want[k].shape)
    ]
    if missing or bad or extra:
        detail = "; ".join(
            x
            for x in (
                f"{len(missing)} missing (e.g. {_example(missing, 1)})" if missing else "",
                f"{len(bad)} of another shape (e.g. {bad[0]})" if bad else "",
                f"{len(extra)} unexpected (e.g. {_example(extra, 1)})" if extra else "",
            )
            if x
        )
        raise ModelLoadError(f"{source}: the {part} weights do not fit the expected layout: {detail}")
    model.load_state_dict(out, strict=True, assign=True)
    on_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if on_meta and next(iter(out.values())).device.type != "meta":
        raise ModelLoadError(f"{source}: the {part} weights left {len(on_meta)} parameters unset (e.g. {on_meta[0]})")
    return model


def build_unet(ck: Checkpoint, cfg: dict, dtype: torch.dtype, source: str):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    sd = convert_ldm_unet_checkpoint(ck.subset(UNET, dtype), cfg)
    with _empty_weights():
        unet = UNet2DConditionModel.from_config(cfg)
    return _fill(unet, sd, source, "UNet")


def build_vae(ck: Checkpoint, cfg: dict | None, dtype: torch.dtype, source: str):
    """A VAE from a checkpoint's ``first_stage_model.`` tensors, or from a VAE file in the original
    layout (``encoder.down.*``) or the diffusers layout (``encoder.down_blocks.*``)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from .configs import architecture

    cfg = dict(cfg or architecture("sd1")["vae"])
    keys = list(ck.keys())
    prefix = next((p for p in (VAE, "vae.", "") if any(k.startswith(p + "decoder.") for k in keys)), None)
    if prefix is None:
        raise ModelLoadError(
            f"{source}: no VAE in it (no 'decoder.' tensors; found {len(keys)} tensors such as {_example(keys)})"
        )
    sub = {k[len(prefix) :]: v for k, v in ck.subset(prefix, dtype).items()}
    if any(k.startswith("decoder.up_blocks.") for k in sub):
        sd = sub  # already in the diffusers layout
    else:
        sd = convert_ldm_vae_checkpoint(sub, cfg)
    with _empty_weights():
        vae = AutoencoderKL.from_config(cfg)
    return _fill(vae, sd, source, "VAE")


def build_text_encoder(ck: Checkpoint, prefix: str, cls_name: str, cfg: dict, dtype, source: str, part: str):
    import transformers
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    cls = getattr(transformers, cls_name)
    config = transformers.CLIPTextConfig.from_dict(dict(cfg))
    with _empty_weights():
        model = cls(config)
    sub = ck.subset(prefix, dtype)
    if prefix.endswith(".model."):  # open_clip layout (fused q/k/v, text_projection transposed)
        sd = convert_open_clip_checkpoint(model, sub, prefix=prefix)
        n = int(config.num_hidden_layers)
        # SD2's 24-layer OpenCLIP-H is read at its penultimate layer: the model keeps 23 layers
        sd = {k: v for k, v in sd.items() if not _layer_at_or_above(k, n)}
    else:
        sd = convert_ldm_clip_checkpoint(sub, remove_prefix=prefix)
    return _fill(model, sd, source, part)


def _layer_at_or_above(key: str, n: int) -> bool:
    parts = key.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return i + 1 < len(parts) and parts[i + 1].isdigit() and int(parts[i + 1]) >= n
    return False


def _tokenizer(pad: str, folder: str | None = None):
    from transformers import CLIPTokenizer

    if folder and os.path.isdir(folder):
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    from ..tiny import write_clip_tokenizer

    with tempfile.TemporaryDirectory(prefix="reneg-tok-") as d:
        write_clip_tokenizer(d, pad_token=pad)
        return CLIPTokenizer.from_pretrained(d, local_files_only=True)


def _configs(family: str, config: str | None, path: str) -> tuple[dict, str | None]:
    """The architecture's configurations: built in, or read from a diffusers folder ``config``."""
    from .configs import architecture

    arch = architecture(family)
    if not config:
        return arch, None
    from .parts import is_sdxl_folder, read_json

    if not os.path.isdir(config):
        raise ModelLoadError(f"--config {config}: no such folder")
    if is_sdxl_folder(config) != (family == "sdxl"):
        raise ModelLoadError(
            f"{path}: is {FAMILIES[family].description}, but the config folder {config} "
            f"{'is' if is_sdxl_folder(config) else 'is not'} an SDXL folder"
        )
    need = {
        "unet": "unet/config.json",
        "vae": "vae/config.json",
        "text_encoder": "text_encoder/config.json",
        "scheduler": "scheduler/scheduler_config.json",
    }
    if family == "sdxl":
        need["text_encoder_2"] = "text_encoder_2/config.json"
    missing = [v for v in need.values() if not os.path.isfile(os.path.join(config, v))]
    if missing:
        raise ModelLoadError(f"{path}: the config folder {config} has no {', '.join(missing)}")
    for part, rel in need.items():
        data = read_json(os.path.join(config, rel))
        if part.startswith("text_encoder"):
            arch[part] = (arch[part][0], data)
        else:
            arch[part] = data
    return arch, config


def build_parts(
    ck: Checkpoint,
    info: CheckpointInfo,
    dtype: torch.dtype = torch.float32,
    config: str | None = None,
    vae: str | None = None,
) -> tuple[dict, dict, str | None]:
    """The diffusers modules of a recognised checkpoint (UNet, VAE, text encoders), the configurations
    they were built with, and the config folder used (None: the built-in configurations). On a
    ``meta`` checkpoint the modules are shape-only: the full path runs without reading data."""

    path = ck.path
    arch, cfg_folder = _configs(info.family, config, path)
    ucfg = dict(arch["unet"])
    proj = ck.shapes.get(UNET + "input_blocks.1.1.proj_in.weight") or ck.shapes.get(
        UNET + "input_blocks.4.1.proj_in.weight"
    )
    if proj is not None and not cfg_folder:
        ucfg["use_linear_projection"] = len(proj) == 2  # as ComfyUI reads it from the shape
    if info.family == "sd2" and not cfg_folder:
        ucfg["sample_size"] = info.native_resolution // 8
        arch["vae"]["sample_size"] = info.native_resolution
    try:
        unet = build_unet(ck, ucfg, dtype, path)
        te_cls, te_cfg = arch["text_encoder"]
        te_prefix = {"sd1": SD1_TE, "sd2": SD2_TE, "sdxl": XL_TE1}[info.family]
        text_encoder = build_text_encoder(ck, te_prefix, te_cls, te_cfg, dtype, path, "text encoder")
        te2 = None
        if info.family == "sdxl":
            c2, cfg2 = arch["text_encoder_2"]
            te2 = build_text_encoder(ck, XL_TE2, c2, cfg2, dtype, path, "second text encoder (OpenCLIP bigG)")
        if vae:
            vae_model = load_vae(vae, dtype, arch["vae"])
        else:
            vae_model = build_vae(ck, arch["vae"], dtype, path)
    except (KeyError, IndexError) as e:
        raise ModelLoadError(
            f"{path}: a {info.architecture} checkpoint with a tensor missing or misnamed ({str(e)[:200]})"
        ) from None
    parts = {"unet": unet, "vae": vae_model, "text_encoder": text_encoder}
    if te2 is not None:
        parts["text_encoder_2"] = te2
    return parts, arch, cfg_folder


def load_single_file(
    path: str,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    config: str | None = None,
    vae: str | None = None,
    prediction_type: str | None = None,
    checkpoint: Checkpoint | None = None,
) -> DiffusersBackend:
    """Recognise and load a single-file checkpoint (see the module's docstring)."""
    from .parts import assemble

    path = os.fspath(path)
    low = path.lower()
    if not low.endswith(CHECKPOINT_SUFFIXES):
        raise ModelLoadError(f"{path}: expected a .safetensors (or .ckpt/.pt) checkpoint or a diffusers folder")
    ck = checkpoint or open_checkpoint(path)
    info = classify(ck, prediction_type)
    if not info.has_vae and not vae:
        raise ModelLoadError(
            f"{path}: has no VAE inside (no {VAE}* tensors); pass --vae FILE|FOLDER "
            f"(e.g. the VAE the model was made with)"
        )
    parts, arch, cfg_folder = build_parts(ck, info, dtype, config, vae)
    unet, vae_model, text_encoder, te2 = (parts.get(k) for k in ("unet", "vae", "text_encoder", "text_encoder_2"))
    tok2 = None
    tokenizer = _tokenizer(arch["tokenizer_pad"], cfg_folder and os.path.join(cfg_folder, "tokenizer"))
    if info.family == "sdxl":
        tok2 = _tokenizer(arch["tokenizer_2_pad"], cfg_folder and os.path.join(cfg_folder, "tokenizer_2"))
    sched = dict(arch["scheduler"], prediction_type=info.prediction_type)
    if info.ztsnr:
        # zero terminal SNR: rescaled betas, and "trailing" steps so sampling starts at the last timestep
        sched.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    backend = assemble(unet, vae_model, text_encoder, tokenizer, sched, path, device, dtype, te2, tok2)
    backend.model_info = {
        "source": path,
        "kind": "single file",
        "architecture": info.architecture,
        "family": info.family,
        "prediction_type": info.prediction_type,
        "prediction_reason": info.prediction_reason,
        "ztsnr": info.ztsnr,
        "vae": vae or "inside",
        "dtype": info.dtype,
    }
    return backend


def describe(info: CheckpointInfo) -> list[str]:
    """Lines for ``reneg inspect``."""
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


def load_vae(path: str, dtype: torch.dtype, vae_config: dict | None = None):
    """``--vae``: a diffusers AutoencoderKL folder (or a pipeline folder with ``vae/``), or a VAE file
    (``.safetensors``; ``.ckpt``/``.pt`` through ``weights_only=True``) in the original or the diffusers
    layout; ``vae_config`` is the architecture's VAE config a file is built with."""
    from diffusers import AutoencoderKL

    path = os.fspath(path)
    if os.path.isdir(path):
        sub = "vae" if os.path.isfile(os.path.join(path, "vae", "config.json")) else None
        if not os.path.isfile(os.path.join(path, sub or "", "config.json")):
            raise ModelLoadError(f"--vae {path}: not a diffusers VAE folder (no config.json, and no vae/config.json)")
        try:
            return AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, EnvironmentError) as e:
            raise ModelLoadError(f"--vae {path}: could not load the VAE: {str(e)[:300]}") from None
    if not os.path.isfile(path):
        raise ModelLoadError(f"--vae {path}: no such file or folder")

    ckpt = open_checkpoint(path)
    return build_vae(ckpt, vae_config, dtype, source=f"--vae {path}")


# --- folders -----------------------------------------------------------------------------------
