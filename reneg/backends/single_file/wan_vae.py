"""The Wan VAEs' own file layouts, read into diffusers' ``AutoencoderKLWan`` (and ``AutoencoderKLQwenImage``,
whose parameter names are the same): Wan 2.1's (``encoder.downsamples.N``, ``decoder.upsamples.N``, ``middle``,
``head``) and Wan 2.2's (``encoder.downsamples.I.downsamples.J``, ``decoder.upsamples.I.upsamples.J``).

Qwen-Image's VAE (``qwen_image_vae.safetensors`` in ComfyUI's ``models/vae/``) and Wan 2.1's (``wan_2.1_vae``,
also Wan 2.2 A14B's) are kept in this layout. diffusers' ``convert_wan_vae_to_diffusers`` renames it for the
released configuration alone (four levels of three decoder residual blocks, hard-coded block numbers);
:func:`wan21_vae_to_diffusers` does the same renaming for any depth, reading the levels from where the
resampling blocks sit, and :func:`wan21_vae_config` reads the configuration from the shapes. At the released
configuration both give diffusers' result key for key (``tests/test_qwen_image.py``).

Wan 2.2's own VAE (``wan2.2_vae.safetensors``, Wan 2.2 TI2V 5B's; ``Wan2.2_VAE.pth`` in Wan-AI's release) is a
residual VAE (diffusers' ``AutoencoderKLWan(is_residual=True)``): its levels are blocks of their own
(``encoder.downsamples.I.downsamples.J``: level ``I``'s residual blocks, then its resampling block; the parameter-free
average / duplicate shortcuts around each level hold no tensors), it reads 2 x 2 patches of the frame (12 input
channels) and makes 48 latent channels. ComfyUI tells it from Wan 2.1's by
``decoder.upsamples.0.upsamples.0.residual.2.weight`` (``comfy/sd.py``) and builds ``comfy/ldm/wan/vae2_2.py``'s
``WanVAE(dim=160, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])``
(decoder 256 wide, its default). :func:`wan22_vae_to_diffusers` renames it for any depth and
:func:`wan22_vae_config` reads the configuration from the shapes; the file holds no latent statistics, so the
release's 48 ``latents_mean`` / ``latents_std`` are given (:data:`WAN22_LATENTS_MEAN`), the values of ComfyUI's
``Wan22`` latent format and of diffusers' converter (``scripts/convert_wan_to_diffusers.py``,
``vae22_diffusers_config``), which made Wan-AI's ``Wan2.2-TI2V-5B-Diffusers`` folder.
"""

from __future__ import annotations

from ..diffusers_backend import ModelLoadError
from .read import Checkpoint, key_examples

WAN21_VAE_KEY = "decoder.middle.0.residual.0.gamma"  # both layouts
WAN22_VAE_KEY = "decoder.upsamples.0.upsamples.0.residual.2.weight"  # Wan 2.2's alone (ComfyUI's test)
# the Wan 2.2 VAE's latent statistics (48 channels): ComfyUI's latent_formats.Wan22, diffusers' converter
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]  # fmt: skip
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]  # fmt: skip

# a residual block's tensors: the original names and diffusers'
RESIDUAL = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
FIXED = {  # outside the down/up sequences
    "conv1.weight": "quant_conv.weight",
    "conv1.bias": "quant_conv.bias",
    "conv2.weight": "post_quant_conv.weight",
    "conv2.bias": "post_quant_conv.bias",
    "encoder.conv1.weight": "encoder.conv_in.weight",
    "encoder.conv1.bias": "encoder.conv_in.bias",
    "decoder.conv1.weight": "decoder.conv_in.weight",
    "decoder.conv1.bias": "decoder.conv_in.bias",
    "encoder.head.0.gamma": "encoder.norm_out.gamma",
    "encoder.head.2.weight": "encoder.conv_out.weight",
    "encoder.head.2.bias": "encoder.conv_out.bias",
    "decoder.head.0.gamma": "decoder.norm_out.gamma",
    "decoder.head.2.weight": "decoder.conv_out.weight",
    "decoder.head.2.bias": "decoder.conv_out.bias",
}


def _residual(rest: str) -> str:
    for old, new in RESIDUAL.items():
        if rest == old:
            return new
    return rest  # a resampling block's tensors (resample.1.*, time_conv.*) keep their names


MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}  # a middle block's three parts


def _shared_name(k: str) -> str | None:
    """diffusers' name of a tensor both layouts keep alike (the quantisation convolutions, the heads, the
    middle blocks), or None for the down / up sequences, where the layouts differ."""
    if k in FIXED:
        return FIXED[k]
    if k.startswith(("encoder.middle.", "decoder.middle.")):
        side, _, i, rest = k.split(".", 3)
        name = MIDDLE.get(i)
        return f"{side}.mid_block.{name}.{_residual(rest)}" if name else k
    return None


def _is_resample(rest: str) -> bool:
    return rest.startswith(("resample.", "time_conv."))


def _sequence(keys, prefix: str) -> dict[int, bool]:
    """The positions of a flat ``downsamples`` / ``upsamples`` sequence, each True where it is a resampling block."""
    out: dict[int, bool] = {}
    for k in keys:
        if k.startswith(prefix):
            i, rest = k[len(prefix) :].split(".", 1)
            out[int(i)] = out.get(int(i), False) or _is_resample(rest)
    return dict(sorted(out.items()))


def wan21_vae_to_diffusers(sd: dict) -> dict:
    """``sd`` (the Wan 2.1 layout) under diffusers' ``AutoencoderKLWan`` names, for any number of levels and
    residual blocks: the encoder's sequence keeps its numbering (diffusers' ``down_blocks`` is flat too); the
    decoder's is cut into levels after each resampling block, level ``i``'s residual blocks becoming
    ``up_blocks.i.resnets.j`` and its resampling block ``up_blocks.i.upsamplers.0``. Names it does not know
    are kept, for the caller's strict fill to report."""
    up = _sequence(sd, "decoder.upsamples.")
    where: dict[int, str] = {}
    level, j = 0, 0
    for i, resample in up.items():
        if resample:
            where[i] = f"decoder.up_blocks.{level}.upsamplers.0"
            level, j = level + 1, 0
        else:
            where[i] = f"decoder.up_blocks.{level}.resnets.{j}"
            j += 1
    out = {}
    for k, v in sd.items():
        shared = _shared_name(k)
        if shared is not None:
            out[shared] = v
        elif k.startswith("encoder.downsamples."):
            i, rest = k[len("encoder.downsamples.") :].split(".", 1)
            out[f"encoder.down_blocks.{i}.{_residual(rest)}"] = v
        elif k.startswith("decoder.upsamples."):
            i, rest = k[len("decoder.upsamples.") :].split(".", 1)
            out[f"{where[int(i)]}.{_residual(rest)}"] = v
        else:
            out[k] = v
    return out


def wan21_vae_config(ck: Checkpoint, source: str) -> dict:
    """diffusers' ``AutoencoderKLWan`` / ``AutoencoderKLQwenImage`` configuration of a Wan 2.1-layout file, from
    its shapes: ``base_dim`` (the first convolution's width), ``z_dim``, the levels' widths (``dim_mult``), the
    residual blocks per level and which resampling blocks also halve time (those with a ``time_conv``)."""
    try:
        base = int(ck.shapes["encoder.conv1.weight"][0])
        z = int(ck.shapes["decoder.conv1.weight"][1])
        down = _sequence(ck.keys(), "encoder.downsamples.")
        levels, blocks, mult, temporal = [], 0, [], []
        for i, resample in down.items():
            if resample:
                temporal.append(f"encoder.downsamples.{i}.time_conv.weight" in ck)
                levels.append(blocks)
                blocks = 0
            else:
                blocks += 1
                if blocks == 1:
                    mult.append(int(ck.shapes[f"encoder.downsamples.{i}.residual.6.weight"][0]) // base)
        levels.append(blocks)
    except KeyError as e:
        raise ModelLoadError(f"{source}: not a Wan 2.1-layout VAE (no {e.args[0]})") from None
    if len(set(levels)) != 1 or not levels[0]:
        raise ModelLoadError(f"{source}: a Wan 2.1-layout VAE with uneven levels ({levels} residual blocks)")
    if any(".attn" in k or k.endswith("to_qkv.weight") for k in ck.keys() if "middle" not in k):
        raise ModelLoadError(
            f"{source}: a Wan 2.1-layout VAE with attention outside its middle blocks, which ReNeg does not read"
        )
    return {
        "base_dim": base,
        "z_dim": z,
        "dim_mult": mult,
        "num_res_blocks": levels[0],
        "attn_scales": [],
        "temperal_downsample": temporal,
    }


# --- Wan 2.2's own VAE -----------------------------------------------------------------------------------


def wan_vae_layout(ck: Checkpoint) -> str | None:
    """``"2.2"`` for Wan 2.2's VAE layout, ``"2.1"`` for Wan 2.1's (also Qwen-Image's), None for neither."""
    if WAN21_VAE_KEY not in ck:
        return None
    return "2.2" if WAN22_VAE_KEY in ck else "2.1"


def not_a_wan_vae(ck: Checkpoint, source: str) -> str:
    """What to say of a file that has neither Wan VAE layout."""
    keys = list(ck.keys())
    return (
        f"{source}: not a Wan VAE file: expected Wan 2.1's layout (wan_2.1_vae.safetensors: "
        f"'{WAN21_VAE_KEY}', 'encoder.downsamples.N.residual...') or Wan 2.2's (wan2.2_vae.safetensors: also "
        f"'{WAN22_VAE_KEY}'); found {len(keys)} tensors such as {key_examples(keys)}"
    )


def _levels(keys, prefix: str, inner: str) -> dict[int, dict[int, bool]]:
    """Wan 2.2's nested sequences: ``{level: {position: is a resampling block}}`` under ``prefix`` (the level
    ``I``) and ``inner`` (the position ``J`` inside it)."""
    out: dict[int, dict[int, bool]] = {}
    for k in keys:
        if k.startswith(prefix):
            i, rest = k[len(prefix) :].split(".", 1)
            if not rest.startswith(inner) or not i.isdigit():
                continue
            j, rest = rest[len(inner) :].split(".", 1)
            level = out.setdefault(int(i), {})
            level[int(j)] = level.get(int(j), False) or _is_resample(rest)
    return {i: dict(sorted(v.items())) for i, v in sorted(out.items())}


def wan22_vae_to_diffusers(sd: dict) -> dict:
    """``sd`` (Wan 2.2's VAE layout) under diffusers' ``AutoencoderKLWan(is_residual=True)`` names, for any number
    of levels and residual blocks: ``encoder.downsamples.I.downsamples.J`` becomes ``encoder.down_blocks.I.resnets.J``
    (a residual block) or ``encoder.down_blocks.I.downsampler`` (the level's resampling block), the decoder's
    ``upsamples.I.upsamples.J`` ``up_blocks.I.resnets.J`` or ``up_blocks.I.upsampler``; the middle blocks, the heads
    and the quantisation convolutions are named as in Wan 2.1's layout. Names it does not know are kept, for the
    caller's strict fill to report."""
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        shared = _shared_name(k)
        if shared is not None:
            out[shared] = v
        elif (
            len(p) > 5
            and (p[0], p[1], p[3]) in (("encoder", "downsamples", "downsamples"), ("decoder", "upsamples", "upsamples"))
            and p[2].isdigit()
            and p[4].isdigit()
        ):
            side, level, j, rest = p[0], p[2], p[4], ".".join(p[5:])
            blocks = "down_blocks" if side == "encoder" else "up_blocks"
            if _is_resample(rest):
                out[f"{side}.{blocks}.{level}.{'downsampler' if side == 'encoder' else 'upsampler'}.{rest}"] = v
            else:
                out[f"{side}.{blocks}.{level}.resnets.{j}.{_residual(rest)}"] = v
        else:
            out[k] = v
    return out


def wan22_vae_config(ck: Checkpoint, source: str) -> dict:
    """diffusers' ``AutoencoderKLWan`` configuration of a file in Wan 2.2's VAE layout, from its shapes: the
    encoder's width (``base_dim``) and the decoder's (``decoder_base_dim``), ``z_dim``, the levels' widths
    (``dim_mult``), the residual blocks per level (the decoder has one more), which levels also halve time (a
    ``time_conv`` in their resampling block), the patch (12 input channels: 3 colours in 2 x 2 patches) and the
    compression it all gives (the release: 16x spatial, 4x temporal); the release's latent statistics."""
    if wan_vae_layout(ck) != "2.2":
        raise ModelLoadError(not_a_wan_vae(ck, source) if wan_vae_layout(ck) is None else
                             f"{source}: the Wan 2.1 VAE's layout, not Wan 2.2's (no {WAN22_VAE_KEY})")  # fmt: skip
    try:
        base, in_ch = (int(x) for x in ck.shapes["encoder.conv1.weight"][:2])
        out_ch = int(ck.shapes["decoder.head.2.weight"][0])
        dec_in, z = (int(x) for x in ck.shapes["decoder.conv1.weight"][:2])
        enc = _levels(ck.keys(), "encoder.downsamples.", "downsamples.")
        dec = _levels(ck.keys(), "decoder.upsamples.", "upsamples.")
        mult, blocks, temporal = [], [], []
        for i, level in enc.items():
            res = [j for j, r in level.items() if not r]
            blocks.append(len(res))
            mult.append(int(ck.shapes[f"encoder.downsamples.{i}.downsamples.{res[0]}.residual.6.weight"][0]) // base)
            if any(level.values()):
                temporal.append(f"encoder.downsamples.{i}.downsamples.{max(level)}.time_conv.weight" in ck)
        dec_blocks = [sum(not r for r in level.values()) for level in dec.values()]
    except (KeyError, IndexError) as e:
        raise ModelLoadError(
            f"{source}: a Wan 2.2-layout VAE without {e.args[0]} (a damaged or cut-down file)"
        ) from None
    patch = round((in_ch / 3) ** 0.5)
    if len(set(blocks)) != 1 or not blocks[0] or set(dec_blocks) != {blocks[0] + 1} or len(dec) != len(enc):
        raise ModelLoadError(
            f"{source}: a Wan 2.2-layout VAE with uneven levels (encoder {blocks}, decoder {dec_blocks} residual "
            "blocks; Wan 2.2's decoder has one more per level than its encoder)"
        )
    if len(temporal) != len(enc) - 1 or 3 * patch * patch != in_ch or out_ch != in_ch:
        raise ModelLoadError(
            f"{source}: a Wan 2.2-layout VAE of another shape ({len(enc)} levels, {len(temporal)} resampling; "
            f"{in_ch} input and {out_ch} output channels, where Wan 2.2 reads 3 colours in square patches)"
        )
    if any(".attn" in k or k.endswith("to_qkv.weight") for k in ck.keys() if "middle" not in k):
        raise ModelLoadError(
            f"{source}: a Wan 2.2-layout VAE with attention outside its middle blocks, which ReNeg does not read"
        )
    if z != len(WAN22_LATENTS_MEAN):
        raise ModelLoadError(
            f"{source}: a Wan 2.2-layout VAE of {z} latent channels; the Wan 2.2 VAE makes "
            f"{len(WAN22_LATENTS_MEAN)}, whose latent statistics ReNeg knows (the file holds none)"
        )
    return {
        "base_dim": base,
        "decoder_base_dim": dec_in // mult[-1],
        "z_dim": z,
        "dim_mult": mult,
        "num_res_blocks": blocks[0],
        "attn_scales": [],
        "temperal_downsample": temporal,
        "latents_mean": list(WAN22_LATENTS_MEAN),
        "latents_std": list(WAN22_LATENTS_STD),
        "is_residual": True,
        "in_channels": in_ch,
        "out_channels": out_ch,
        "patch_size": patch,
        "scale_factor_temporal": 2 ** sum(temporal),
        "scale_factor_spatial": patch * 2 ** (len(enc) - 1),
    }
