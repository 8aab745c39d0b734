"""Building a recognised single-file checkpoint's diffusers modules, and the backend from them.

The modules are made from the configurations in :mod:`reneg.backends.configs` (or a diffusers
folder given as ``config``) and filled with the checkpoint's tensors, renamed by diffusers' own
single-file conversion functions (``diffusers.loaders.single_file_utils``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import torch

from ...families import FAMILIES, Family
from ..diffusers_backend import DiffusersBackend, ModelLoadError
from .detect import CheckpointInfo, classify
from .read import CHECKPOINT_SUFFIXES, UNET, VAE, Checkpoint, key_examples, open_checkpoint

# the diffusers part and the name messages give it, for a family's text encoders in order
ENCODER_SLOTS = (("text_encoder", "text encoder"), ("text_encoder_2", "second text encoder"))


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
                f"{len(missing)} missing (e.g. {key_examples(missing, 1)})" if missing else "",
                f"{len(bad)} of another shape (e.g. {bad[0]})" if bad else "",
                f"{len(extra)} unexpected (e.g. {key_examples(extra, 1)})" if extra else "",
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

    from ..configs import architecture

    cfg = dict(cfg or architecture("sd1")["vae"])
    keys = list(ck.keys())
    prefix = next((p for p in (VAE, "vae.", "") if any(k.startswith(p + "decoder.") for k in keys)), None)
    if prefix is None:
        raise ModelLoadError(
            f"{source}: no VAE in it (no 'decoder.' tensors; found {len(keys)} tensors such as {key_examples(keys)})"
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
    from ..clip_tokenizer import write_clip_tokenizer

    with tempfile.TemporaryDirectory(prefix="reneg-tok-") as d:
        write_clip_tokenizer(d, pad_token=pad)
        return CLIPTokenizer.from_pretrained(d, local_files_only=True)


def _configs(family: Family, config: str | None, path: str) -> tuple[dict, str | None]:
    """The architecture's configurations: built in, or read from a diffusers folder ``config``."""
    from ..configs import architecture

    arch = architecture(family.name)
    if not config:
        return arch, None
    from ..parts import is_sdxl_folder, read_json

    if not os.path.isdir(config):
        raise ModelLoadError(f"--config {config}: no such folder")
    two = len(family.checkpoint_encoders) == 2
    if is_sdxl_folder(config) != two:  # a two-encoder folder is an SDXL folder
        raise ModelLoadError(
            f"{path}: is {family.description}, but the config folder {config} "
            f"{'is' if is_sdxl_folder(config) else 'is not'} an SDXL folder"
        )
    need = {
        "unet": "unet/config.json",
        "vae": "vae/config.json",
        "text_encoder": "text_encoder/config.json",
        "scheduler": "scheduler/scheduler_config.json",
    }
    if two:
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
    family = FAMILIES[info.family]
    arch, cfg_folder = _configs(family, config, path)
    ucfg = dict(arch["unet"])
    proj = ck.shapes.get(UNET + "input_blocks.1.1.proj_in.weight") or ck.shapes.get(
        UNET + "input_blocks.4.1.proj_in.weight"
    )
    if proj is not None and not cfg_folder:
        ucfg["use_linear_projection"] = len(proj) == 2  # as ComfyUI reads it from the shape
    if not cfg_folder:  # the release's own size (SD2.x: 512 px, or 768 px for its v-prediction model)
        ucfg["sample_size"] = info.native_resolution // 8
        arch["vae"]["sample_size"] = info.native_resolution
    try:
        unet = build_unet(ck, ucfg, dtype, path)
        encoders = {}
        for i, ((prefix, name), (key, part)) in enumerate(zip(family.checkpoint_encoders, ENCODER_SLOTS)):
            cls_name, cfg = arch[key]
            label = part if i == 0 else f"{part} ({name})"  # e.g. "second text encoder (OpenCLIP bigG)"
            encoders[key] = build_text_encoder(ck, prefix, cls_name, cfg, dtype, path, label)
        if vae:
            vae_model = load_vae(vae, dtype, arch["vae"])
        else:
            vae_model = build_vae(ck, arch["vae"], dtype, path)
    except (KeyError, IndexError) as e:
        raise ModelLoadError(
            f"{path}: a {info.architecture} checkpoint with a tensor missing or misnamed ({str(e)[:200]})"
        ) from None
    return {"unet": unet, "vae": vae_model, **encoders}, arch, cfg_folder


def load_single_file(
    path: str,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    config: str | None = None,
    vae: str | None = None,
    prediction_type: str | None = None,
    checkpoint: Checkpoint | None = None,
) -> DiffusersBackend:
    """Recognise and load a single-file checkpoint (see :mod:`reneg.backends.single_file`)."""
    from ..parts import assemble

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
    tokenizers = [  # one per text encoder: "tokenizer", "tokenizer_2"
        _tokenizer(arch[f"{tok}_pad"], cfg_folder and os.path.join(cfg_folder, tok))
        for tok in ("tokenizer", "tokenizer_2")[: len(FAMILIES[info.family].checkpoint_encoders)]
    ]
    tokenizer, tok2 = tokenizers[0], (tokenizers[1] if len(tokenizers) > 1 else None)
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


def transformer_file_parts(path: str, text_encoders, vae: str | None, model: str, check, reads: str, one: str,
                           te_file: str, vae_word: str, vae_file: str) -> Checkpoint:  # fmt: skip
    """The one text-encoder file a ``model`` transformer file (``path``, ComfyUI's layout) loads with, checked:
    ``check(ck)`` is None for the right encoder, else what the file is (said with ``--text-encoder FILE:``
    and what ``model`` reads); none or two are asked for by the flag, naming ``one`` and where ComfyUI keeps
    ``te_file``; a missing ``vae`` (its ``vae_word``, ComfyUI's ``vae_file``) too."""
    from .read import open_checkpoint

    found = []
    for te in text_encoders or ():
        tck = open_checkpoint(te)
        what = check(tck)
        if what is not None:
            raise ModelLoadError(f"--text-encoder {te}: {what}; {model} reads {reads}")
        found.append(tck)
    if len(found) != 1:
        raise ModelLoadError(
            f"{path}: a {model} transformer file needs its text encoder: pass --text-encoder FILE once, for {one} "
            f"(ComfyUI keeps it in models/text_encoders/: {te_file})"
        )
    if not vae:
        raise ModelLoadError(f"{path}: a {model} transformer file needs its {vae_word}: pass --vae FILE "
                             f"(ComfyUI keeps it as models/vae/{vae_file})")  # fmt: skip
    return found[0]
