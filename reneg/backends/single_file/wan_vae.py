"""The Wan 2.1 VAE's own file layout (``encoder.downsamples.N``, ``decoder.upsamples.N``, ``middle``, ``head``),
read into diffusers' ``AutoencoderKLWan`` / ``AutoencoderKLQwenImage`` (whose parameter names are the same).

Qwen-Image's VAE (``qwen_image_vae.safetensors`` in ComfyUI's ``models/vae/``) and Wan 2.1's (``wan_2.1_vae``,
also Wan 2.2 A14B's) are kept in this layout. diffusers' ``convert_wan_vae_to_diffusers`` renames it for the
released configuration alone (four levels of three decoder residual blocks, hard-coded block numbers);
:func:`wan21_vae_to_diffusers` does the same renaming for any depth, reading the levels from where the
resampling blocks sit, and :func:`wan21_vae_config` reads the configuration from the shapes. At the released
configuration both give diffusers' result key for key (``tests/test_qwen_image.py``).
"""

from __future__ import annotations

from ..diffusers_backend import ModelLoadError
from .read import Checkpoint

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
        if k in FIXED:
            out[FIXED[k]] = v
        elif k.startswith(("encoder.middle.", "decoder.middle.")):
            side, _, i, rest = k.split(".", 3)
            name = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}.get(i)
            out[f"{side}.mid_block.{name}.{_residual(rest)}" if name else k] = v
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
