"""Wan's single files as ComfyUI keeps them, named from their keys and shapes (no tensor is read).

A ComfyUI Wan user holds a transformer in ``models/diffusion_models/`` (``wan2.1_t2v_1.3B_fp16.safetensors``,
``wan2.2_t2v_high_noise_14B_fp16.safetensors`` and its ``low_noise`` twin, ``wan2.2_ti2v_5B_fp16.safetensors``:
Wan's own layout, ``patch_embedding``, ``text_embedding``, ``blocks.N.self_attn`` / ``cross_attn``,
``head.modulation``), the UMT5-XXL text encoder in ``models/text_encoders/`` (``umt5_xxl_fp16.safetensors``,
``umt5_xxl_fp8_e4m3fn_scaled.safetensors``: transformers' ``UMT5EncoderModel`` names, a relative attention
bias in every layer) and the VAE in ``models/vae/`` (``wan_2.1_vae.safetensors``, named by :mod:`.qwen_image`,
whose VAE has Wan 2.1's layout; ``wan2.2_vae.safetensors``, Wan 2.2 TI2V 5B's own, named here).
:func:`wan_part` tells them apart as ComfyUI's ``model_detection.py`` and ``sd.py`` do (``head.modulation``
makes a Wan transformer; ``img_emb`` or 36 input channels an image-to-video one, ``vace_blocks`` VACE, 48 output
channels Wan 2.2 TI2V 5B; ``decoder.upsamples.0.upsamples.0.residual.2.weight`` the Wan 2.2 VAE).

ReNeg trains, tunes and evaluates Wan from a diffusers ``WanPipeline`` folder (:mod:`reneg.backends.wan`) or
from these files together (:func:`load_wan_files`: a Wan 2.1 T2V transformer, or Wan 2.2 A14B's high-noise
expert with ``--low-noise-model``, as ``--model``, ``--text-encoder`` umt5_xxl and ``--vae`` wan_2.1_vae; or
Wan 2.2 TI2V 5B's transformer with ``--vae`` wan2.2_vae; the tokenizer the one ComfyUI reads from the UMT5
file's ``spiece_model``, or ``--tokenizer``). ``reneg inspect`` describes each file; the text encoder or the
Wan 2.2 VAE given alone as ``--model`` is refused with a message that says what to pass.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from .qwen_image import _layers as _count
from .qwen_image import _weights
from .read import Checkpoint
from .wan_vae import wan_vae_layout

TRANSFORMER_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
UMT5_KEY = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"  # in every UMT5 layer
FOLDERS = {  # where ComfyUI keeps each part, and the node that loads it
    "transformer": ("models/diffusion_models", "Load Diffusion Model (UNETLoader)"),
    "text_encoder": ("models/text_encoders", "Load CLIP (CLIPLoader), type wan"),
    "vae": ("models/vae", "Load VAE (VAELoader)"),
}
REFUSAL = (
    "trains, tunes and evaluates Wan from a diffusers WanPipeline folder (transformer/ and, for Wan 2.2 "
    "A14B, transformer_2/, text_encoder/, tokenizer/, vae/, scheduler/), or from these files together: a "
    "text-to-video transformer as --model (Wan 2.2 A14B: the high-noise expert, with --low-noise-model), "
    "--text-encoder umt5_xxl, --vae wan_2.1_vae (Wan 2.2 TI2V 5B: --vae wan2.2_vae); in ComfyUI the ReNeg "
    "nodes work with the model ComfyUI loads from these files"
)
HEAD = 128  # Wan's attention heads, in every release
TI2V_CHANNELS = 48  # Wan 2.2 TI2V 5B's latent channels (its VAE's); ComfyUI picks WAN22_T2V by 48 output channels


@dataclass
class WanPart:
    path: str
    part: str  # transformer | text_encoder | vae
    description: str
    details: dict = field(default_factory=dict)
    supported: bool = True  # a text-to-video model (or its text encoder, its VAE): what ReNeg learns negatives for
    size: int = 0

    def to_json(self) -> dict:
        folder, loader = FOLDERS[self.part]
        return dict(asdict(self), architecture="Wan", family="wan" if self.supported else None,
                    comfyui_folder=folder, comfyui_loader=loader)  # fmt: skip

    def describe(self) -> list[str]:
        folder, loader = FOLDERS[self.part]
        lines = [self.path, f"  Wan part      {self.description}"]
        lines += [f"  {k:<13} {v}" for k, v in self.details.items()]
        lines.append(f"  ComfyUI keeps it in {folder}/, loaded by {loader}")
        lines.append(f"  ReNeg         {REFUSAL}")
        return lines

    def refusal(self) -> str:
        return f"{self.path}: {self.description}, one part of a Wan model on its own; ReNeg {REFUSAL}"


def _transformer(ck: Checkpoint) -> WanPart | None:
    keys = list(ck.keys())
    for pre in TRANSFORMER_PREFIXES:
        if pre + "head.modulation" in ck and pre + "patch_embedding.weight" in ck:
            break
    else:
        return None
    dim, in_ch = (int(x) for x in ck.shapes[pre + "patch_embedding.weight"][:2])
    layers = _count(ck, pre + "blocks.")
    ffn = ck.shapes.get(pre + "blocks.0.ffn.0.weight", (0,))[0]
    text = ck.shapes.get(pre + "text_embedding.0.weight", (0, 0))[1]
    details = {
        "blocks": f"{layers} blocks {dim} wide ({dim // 128} heads of 128), feed-forward {ffn}",
        "reads": f"{in_ch} latent channels; UMT5 rows {text} wide",
        "weights": _weights(ck) + (f", keys under {pre!r}" if pre else ""),
    }
    if any(k.startswith(pre + "vace_blocks.") for k in keys):
        return WanPart(ck.path, "transformer", "a Wan VACE transformer (video editing), which ReNeg does not support",
                       details, False)  # fmt: skip
    if pre + "img_emb.proj.0.weight" in ck or in_ch == 36:
        what = "a Wan image-to-video transformer (I2V)"
        return WanPart(ck.path, "transformer", f"{what}; ReNeg learns negatives for Wan text-to-video models",
                       details, False)  # fmt: skip
    known = {(1536, 16): "Wan 2.1 T2V 1.3B", (5120, 16): "Wan 2.1 T2V 14B or one expert of Wan 2.2 T2V A14B",
             (3072, 48): "Wan 2.2 TI2V 5B (used for text to video)"}  # fmt: skip
    other = "Wan 2.2 TI2V-shaped (48 latent channels)" if in_ch == TI2V_CHANNELS else "Wan text-to-video"
    name = known.get((dim, in_ch), other)
    if (dim, in_ch) == (5120, 16):
        details["note"] = "Wan 2.2 A14B keeps two such files (high_noise and low_noise experts)"
    if in_ch == TI2V_CHANNELS:
        details["note"] = (
            "reads Wan 2.2's own VAE (wan2.2_vae.safetensors, 48 channels), one timestep per latent token "
            "(expand_timesteps), sampled at shift 5"
        )
    return WanPart(ck.path, "transformer", f"the {name} transformer (Wan's own layout)", details)


def _vae(ck: Checkpoint) -> WanPart | None:
    """Wan 2.2's own VAE (the Wan 2.1 layout is named by :mod:`.qwen_image`, whose VAE file it shares)."""
    if wan_vae_layout(ck) != "2.2":
        return None
    from ..diffusers_backend import ModelLoadError
    from .wan_vae import wan22_vae_config

    try:
        c = wan22_vae_config(ck, ck.path)
        latent = (
            f"{c['z_dim']} channels, {c['scale_factor_spatial']}x spatial and {c['scale_factor_temporal']}x temporal "
            f"({len(c['dim_mult'])} levels {c['base_dim']} / {c['decoder_base_dim']} wide over {c['in_channels']} "
            f"input channels: 3 colours in {c['patch_size']} x {c['patch_size']} patches)"
        )
    except ModelLoadError as e:
        latent = f"not read: {str(e).removeprefix(ck.path + ': ')}"
    details = {
        "latent": latent,
        "weights": _weights(ck),
        "note": "Wan 2.2 TI2V 5B's VAE: pass it as --vae beside its transformer (wan2.2_ti2v_5B, --model) and "
        "umt5_xxl (--text-encoder)",
    }
    return WanPart(ck.path, "vae", "the Wan 2.2 VAE (Wan 2.2 TI2V 5B's, residual, 48 latent channels)", details)


def wan_part(ck: Checkpoint) -> WanPart | None:
    """What Wan part ``ck`` is (a transformer, the UMT5-XXL encoder or Wan 2.2's VAE), or None when it is none."""
    size = os.path.getsize(ck.path) if os.path.isfile(ck.path) else 0
    found = _transformer(ck) or _vae(ck)
    if found is None and UMT5_KEY in ck and "shared.weight" in ck:
        vocab, width = (int(x) for x in ck.shapes["shared.weight"])
        details = {
            "encoder": f"UMT5, {_count(ck, 'encoder.block.')} layers, {width} wide, vocabulary {vocab}",
            "weights": _weights(ck),
        }
        if "spiece_model" in ck:
            details["tokenizer"] = "inside (spiece_model), where ComfyUI reads Wan's tokenizer from"
        ok = width == 4096
        found = WanPart(ck.path, "text_encoder", "the UMT5-XXL text encoder: Wan's rows" if ok
                        else f"a UMT5 text encoder {width} wide (Wan reads 4096)", details, ok)  # fmt: skip
    if found is not None:
        found.size = size
    return found


# --- loading the files together ------------------------------------------------------------------------


def transformer_config(ck: Checkpoint, prefix: str) -> dict:
    """diffusers' ``WanTransformer3DModel`` configuration of a Wan-layout transformer file, from its shapes
    (Wan 2.1 1.3B: 30 blocks 1536 wide, 12 heads of 128, feed-forward 8960; 14B and each A14B expert: 40
    blocks 5120 wide; every release: patches 1 x 2 x 2, UMT5 rows 4096 wide, 256 frequencies, RMS norm on
    queries and keys across heads, a norm before cross-attention, eps 1e-6)."""
    from ..diffusers_backend import ModelLoadError

    pe = ck.shapes[prefix + "patch_embedding.weight"]
    dim, in_ch = int(pe[0]), int(pe[1])
    patch = tuple(int(x) for x in pe[2:])
    if dim % HEAD:
        raise ModelLoadError(f"{ck.path}: a Wan transformer {dim} wide, not a whole number of Wan's heads of {HEAD}")
    n = 1
    for x in patch:
        n *= x
    return {
        "patch_size": patch,
        "num_attention_heads": dim // HEAD,
        "attention_head_dim": HEAD,
        "in_channels": in_ch,
        "out_channels": int(ck.shapes[prefix + "head.head.weight"][0]) // n,
        "text_dim": int(ck.shapes[prefix + "text_embedding.0.weight"][1]),
        "freq_dim": int(ck.shapes[prefix + "time_embedding.0.weight"][1]),
        "ffn_dim": int(ck.shapes[prefix + "blocks.0.ffn.0.weight"][0]),
        "num_layers": _count(ck, prefix + "blocks."),
        "cross_attn_norm": prefix + "blocks.0.norm3.weight" in ck,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
    }


def _transformer_file(path: str, dtype, flag: str):
    """One Wan text-to-video transformer file, converted with diffusers' ``convert_wan_transformer_to_diffusers``
    (renames only, at any width and depth), and its configuration."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from ..diffusers_backend import ModelLoadError
    from .build import _empty_weights, _fill
    from .read import open_checkpoint

    ck = open_checkpoint(path)
    part = wan_part(ck)
    if part is None or part.part != "transformer":
        what = part.description if part else "not a Wan transformer"
        raise ModelLoadError(f"{flag} {path}: {what}; give a Wan text-to-video transformer file")
    if not part.supported:
        raise ModelLoadError(f"{flag} {path}: {part.description}")
    pre = next(p for p in TRANSFORMER_PREFIXES if p + "head.modulation" in ck)
    cfg = transformer_config(ck, pre)
    sd = convert_wan_transformer_to_diffusers({k[len(pre) :]: v for k, v in ck.subset(pre, dtype).items()})
    with _empty_weights():
        model = WanTransformer3DModel.from_config(cfg)
    return _fill(model, sd, path, "Wan transformer"), cfg


def _tokenizer(ck: Checkpoint, tokenizer: str | None):
    """``--tokenizer`` (a WanPipeline folder's ``tokenizer/``, google/umt5-xxl's), else the SentencePiece model
    ComfyUI keeps in the UMT5 file (``spiece_model``), read as transformers' T5 tokenizer: the ids
    SentencePiece itself gives, with ``</s>`` appended, as ComfyUI's Wan text encoder tokenizes."""
    import tempfile

    from transformers import AutoTokenizer, T5Tokenizer

    from ..diffusers_backend import ModelLoadError
    from ..parts import load_t5_tokenizer

    if tokenizer:
        return load_t5_tokenizer(tokenizer, AutoTokenizer), tokenizer
    if "spiece_model" not in ck:
        raise ModelLoadError(
            f"{ck.path}: no tokenizer inside (ComfyUI's umt5_xxl files keep one as 'spiece_model'); pass "
            "--tokenizer FOLDER (a WanPipeline folder's tokenizer/)"
        )
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "spiece.model"), "wb") as f:
            f.write(ck.tensor("spiece_model").numpy().tobytes())
        try:
            tok = T5Tokenizer.from_pretrained(d, extra_ids=0, model_max_length=512)
        except Exception as e:  # sentencepiece / protobuf missing, or not a SentencePiece model
            raise ModelLoadError(
                f"{ck.path}: its tokenizer (spiece_model) could not be read ({type(e).__name__}: {str(e)[:200]}); "
                "`pip install sentencepiece protobuf`, or pass --tokenizer FOLDER"
            ) from None
    return tok, f"{ck.path} (spiece_model)"


def _vae_file(vae: str, in_ch: int, what: str, dtype):
    """The ``--vae`` file (or diffusers VAE folder) for a transformer reading ``in_ch`` latent channels (``what``
    names it): Wan 2.1's layout for 16, Wan 2.2's for 48 (:mod:`.wan_vae`); the wrong one, or a file of neither
    layout, refused naming the flag before anything is read."""
    from diffusers import AutoencoderKLWan

    from ..diffusers_backend import ModelLoadError
    from .build import _empty_weights, _fill
    from .read import open_checkpoint
    from .wan_vae import not_a_wan_vae, wan21_vae_config, wan21_vae_to_diffusers, wan22_vae_config
    from .wan_vae import wan22_vae_to_diffusers

    want = "wan2.2_vae.safetensors" if in_ch == TI2V_CHANNELS else "wan_2.1_vae.safetensors"
    if os.path.isdir(vae):
        try:
            model = AutoencoderKLWan.from_pretrained(vae, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, EnvironmentError) as e:
            raise ModelLoadError(f"--vae {vae}: not a diffusers AutoencoderKLWan folder: {str(e)[:300]}") from None
        if int(model.config.z_dim) != in_ch:
            raise ModelLoadError(f"--vae {vae}: a VAE of {model.config.z_dim} latent channels; {what} reads {in_ch}")
        return model
    ck = open_checkpoint(vae)
    layout = wan_vae_layout(ck)
    if layout is None:
        raise ModelLoadError(not_a_wan_vae(ck, f"--vae {vae}") + f"; {what} reads {want}")
    z = int(ck.shapes["decoder.conv1.weight"][1])
    if z != in_ch:
        raise ModelLoadError(
            f"--vae {vae}: the Wan {layout} VAE's layout, {z} latent channels; {what} reads {in_ch} (ComfyUI keeps "
            f"its VAE as models/vae/{want})"
        )
    config, convert = (
        (wan22_vae_config, wan22_vae_to_diffusers) if layout == "2.2" else (wan21_vae_config, wan21_vae_to_diffusers)
    )
    with _empty_weights():
        model = AutoencoderKLWan(**config(ck, f"--vae {vae}"))
    return _fill(model, convert(ck.subset("", dtype)), f"--vae {vae}", "VAE")


def load_wan_files(path: str, text_encoders=(), vae: str | None = None, tokenizer: str | None = None,
                   device="cpu", dtype=None, frames: int | None = None, low_noise: str | None = None):  # fmt: skip
    """A :class:`reneg.backends.wan.WanBackend` from the files a ComfyUI Wan user holds: a text-to-video
    transformer (``path``: Wan 2.1 T2V, or Wan 2.2 A14B's high-noise expert with its low-noise twin as
    ``low_noise``, switched at the release's boundary 0.875, or Wan 2.2 TI2V 5B's), UMT5-XXL (``text_encoders``),
    the VAE (``vae``: Wan 2.1's for 16 latent channels, Wan 2.2's for TI2V 5B's 48; a diffusers VAE folder also
    does) and the tokenizer (inside the UMT5 file, or ``tokenizer``). The scheduler is the release's: shift 3 for
    Wan 2.1, 12 for A14B, 5 for TI2V 5B, which also gets one timestep per latent token (``expand_timesteps``), as
    diffusers' converter writes Wan-AI's ``Wan2.2-TI2V-5B-Diffusers``. The parts are checked against each other
    as a folder's are (:func:`reneg.backends.wan.build_backend`)."""
    import torch

    from ..diffusers_backend import ModelLoadError
    from ..wan import A14B_BOUNDARY, A14B_FLOW_SHIFT, SCHEDULER, TI2V_FLOW_SHIFT, build_backend
    from .build import transformer_file_parts
    from .flux import _t5
    from .read import open_checkpoint

    dtype = dtype or torch.float32

    def check(tck):
        tpart = wan_part(tck)
        ok = tpart is not None and tpart.part == "text_encoder" and tpart.supported
        return None if ok else (tpart.description if tpart else "not UMT5-XXL (umt5_xxl)")

    tck = open_checkpoint(path)
    pre = next((p for p in TRANSFORMER_PREFIXES if p + "head.modulation" in tck), "")
    in_ch = int(tck.shapes.get(pre + "patch_embedding.weight", (0, 0))[1])
    ti2v = in_ch == TI2V_CHANNELS
    vae_file = "wan2.2_vae.safetensors" if ti2v else "wan_2.1_vae.safetensors"
    te_ck = transformer_file_parts(path, text_encoders, vae, "Wan", check, "UMT5-XXL (umt5_xxl_fp16.safetensors)",
                                   "UMT5-XXL", "umt5_xxl_fp16.safetensors", "VAE", vae_file)  # fmt: skip
    if ti2v and low_noise:
        raise ModelLoadError(f"--low-noise-model {low_noise}: for Wan 2.2 A14B's two experts; {path} is Wan 2.2 TI2V "
                             "5B, one transformer")  # fmt: skip
    what = f"--model {path} (" + ("Wan 2.2 TI2V 5B" if ti2v else f"a Wan transformer of {in_ch} latent channels") + ")"
    vae_model = _vae_file(vae, in_ch, what, dtype)  # the cheap check first: a wrong VAE is said before the weights
    transformer, cfg = _transformer_file(path, dtype, "--model")
    transformer_2 = None
    if low_noise:
        transformer_2, cfg2 = _transformer_file(low_noise, dtype, "--low-noise-model")
        if cfg2 != cfg:
            diff = ", ".join(f"{k} {cfg[k]} vs {cfg2[k]}" for k in cfg if cfg[k] != cfg2[k])
            raise ModelLoadError(f"--low-noise-model {low_noise}: not the twin of {path} ({diff})")
    tok, tok_from = _tokenizer(te_ck, tokenizer)
    try:
        text_encoder = _t5(te_ck, "", dtype, umt5=True)
    except KeyError as e:
        raise ModelLoadError(
            f"{te_ck.path}: a UMT5 file lacks the tensor {e.args[0]} (a damaged or cut-down file)"
        ) from None
    if transformer_2 is not None:
        sched = dict(SCHEDULER, flow_shift=A14B_FLOW_SHIFT)
    elif ti2v:
        sched = dict(SCHEDULER, flow_shift=TI2V_FLOW_SHIFT)
    else:
        sched = dict(SCHEDULER)
    info = {
        "source": path,
        "kind": "single files (ComfyUI)",
        "text_encoders": [te_ck.path],
        "low_noise_model": low_noise,
        "vae": vae,
        "tokenizer": tok_from,
        "expand_timesteps": ti2v,
    }
    boundary = A14B_BOUNDARY if transformer_2 is not None else None
    return build_backend(transformer, transformer_2, boundary, vae_model, text_encoder, tok, sched, path, device,
                         dtype, info, frames)  # fmt: skip
