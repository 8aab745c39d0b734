"""Write diffusers modules as a single-file checkpoint in the layout the UIs save.

The key names are those of the original Stable Diffusion / SDXL checkpoints, as
ComfyUI's "Save Checkpoint" and A1111 write them: the UNet under
``model.diffusion_model.`` (``input_blocks``/``middle_block``/``output_blocks``), the VAE
under ``first_stage_model.`` (``encoder.down.N.block.M``, 1x1-conv attention), CLIP-L
in the transformers layout (``cond_stage_model.transformer.text_model.`` or
``conditioner.embedders.0.transformer.text_model.``) and OpenCLIP in the open_clip
layout (``cond_stage_model.model.`` / ``conditioner.embedders.1.model.``: fused
``in_proj``, ``text_projection`` as ``[width, dim]``). The mapping is the inverse of
diffusers' single-file conversion; the tests check that it round-trips.

``write_header_only`` writes the header of such a file over a sparse file of the full
size, so full-size architectures are recognised without writing gigabytes.
"""

from __future__ import annotations

import json
import struct

import torch

UNET, VAE = "model.diffusion_model.", "first_stage_model."
SD1_TE, SD2_TE = "cond_stage_model.transformer.", "cond_stage_model.model."
XL_TE1, XL_TE2 = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)


def _rename(sd: dict, prefixes: dict, inner: dict) -> dict:
    """Replace the longest matching diffusers prefix; ``inner[ldm_prefix]`` renames what follows."""
    order = sorted(prefixes, key=len, reverse=True)
    out = {}
    for k, v in sd.items():
        p = next((p for p in order if k == p or k.startswith(p + ".")), None)
        if p is None:
            raise KeyError(f"no original-layout name for {k}")
        rest = k[len(p) :]
        for a, b in inner.get(prefixes[p], ()):
            if rest.startswith("." + a + "."):
                rest = "." + b + rest[len(a) + 1 :]
                break
        out[prefixes[p] + rest] = v
    return out


def unet_to_ldm(sd: dict, cfg: dict) -> dict:
    n, levels = cfg["layers_per_block"], len(cfg["block_out_channels"])
    m = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    resnets = {"middle_block.0", "middle_block.2"}
    for i in range(levels):
        for j in range(n):
            k = 1 + i * (n + 1) + j
            m[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
            resnets.add(f"input_blocks.{k}.0")
        m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (n + 1)}.0.op"
        for j in range(n + 1):
            k = i * (n + 1) + j
            m[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
            resnets.add(f"output_blocks.{k}.0")
        attn = "CrossAttn" in cfg["up_block_types"][i]
        m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (n + 1) + n}.{2 if attn else 1}.conv"
    out = _rename(sd, m, {r: _RESNET for r in resnets})
    return {UNET + k: v for k, v in out.items()}


def vae_to_ldm(sd: dict, cfg: dict, prefix: str = VAE) -> dict:
    levels = len(cfg["block_out_channels"])
    m = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for a in (
        "encoder.conv_in",
        "encoder.conv_out",
        "decoder.conv_in",
        "decoder.conv_out",
        "quant_conv",
        "post_quant_conv",
    ):
        m[a] = a
    attn_inner = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
    res_inner = (("conv_shortcut", "nin_shortcut"),)
    inner = {}
    for part in ("encoder", "decoder"):
        m[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        m[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        m[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
        inner[f"{part}.mid.attn_1"] = attn_inner
        for i in range(levels):
            src = i if part == "encoder" else levels - 1 - i
            d = "down" if part == "encoder" else "up"
            for j in range(cfg["layers_per_block"] + (part == "decoder")):
                m[f"{part}.{d}_blocks.{i}.resnets.{j}"] = f"{part}.{d}.{src}.block.{j}"
                inner[f"{part}.{d}.{src}.block.{j}"] = res_inner
            m[f"{part}.{d}_blocks.{i}.{d}samplers.0.conv"] = f"{part}.{d}.{src}.{d}sample.conv"
    out = _rename(sd, m, inner)
    for k, v in list(out.items()):
        if ".mid.attn_1." in k and k.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            out[k] = v.reshape(*v.shape, 1, 1)  # 1x1 convolutions in the original layout
    return {prefix + k: v for k, v in out.items()}


def clip_to_ldm(sd: dict, prefix: str, position_ids: bool = False) -> dict:
    out = {
        prefix + "text_model." + k.removeprefix("text_model."): v
        for k, v in sd.items()
        if not k.startswith("text_projection")
    }
    if position_ids:  # many SD1.x files carry this buffer
        out[prefix + "text_model.embeddings.position_ids"] = torch.arange(77).reshape(1, 77)
    return out


def open_clip_to_ldm(sd: dict, prefix: str, layers: int, extra_layer: bool = False) -> dict:
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {
        prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["final_layer_norm.bias"],
    }
    width = sd["final_layer_norm.weight"].shape[0]
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    else:  # SD2's OpenCLIP-H keeps its (unused) projection
        out[prefix + "text_projection"] = torch.zeros(
            width, width, dtype=sd["final_layer_norm.weight"].dtype, device=sd["final_layer_norm.weight"].device
        )
    out[prefix + "logit_scale"] = torch.ones(
        (), dtype=out[prefix + "text_projection"].dtype, device=out[prefix + "text_projection"].device
    )
    for i in range(layers + int(extra_layer)):
        s = f"encoder.layers.{min(i, layers - 1)}."
        t = f"{prefix}transformer.resblocks.{i}."
        if i == layers:  # SD2's 24th layer, which the model never reads: a copy of the last one
            sd = {k: (v.clone() if k.startswith(s) else v) for k, v in sd.items()}
        for w in ("weight", "bias"):
            out[t + f"attn.in_proj_{w}"] = torch.cat([sd[s + f"self_attn.{q}_proj.{w}"] for q in "qkv"])
            out[t + f"attn.out_proj.{w}"] = sd[s + f"self_attn.out_proj.{w}"]
            out[t + f"ln_1.{w}"] = sd[s + f"layer_norm1.{w}"]
            out[t + f"ln_2.{w}"] = sd[s + f"layer_norm2.{w}"]
            out[t + f"mlp.c_fc.{w}"] = sd[s + f"mlp.fc1.{w}"]
            out[t + f"mlp.c_proj.{w}"] = sd[s + f"mlp.fc2.{w}"]
    return out


def pipeline_to_ldm(parts: dict, family: str, vae: bool = True) -> dict:
    """``parts``: {"unet": (module, cfg), "vae": (module, cfg), "text_encoder": module, "text_encoder_2": module}."""
    unet, ucfg = parts["unet"]
    sd = unet_to_ldm(unet.state_dict(), ucfg)
    if vae:
        v, vcfg = parts["vae"]
        sd.update(vae_to_ldm(v.state_dict(), vcfg))
    te = parts["text_encoder"]
    if family == "sd1":
        sd.update(clip_to_ldm(te.state_dict(), SD1_TE, position_ids=True))
    elif family == "sd2":
        sd.update(open_clip_to_ldm(te.state_dict(), SD2_TE, te.config.num_hidden_layers, extra_layer=True))
    else:
        sd.update(clip_to_ldm(te.state_dict(), XL_TE1))
        te2 = parts["text_encoder_2"]
        sd.update(open_clip_to_ldm(te2.state_dict(), XL_TE2, te2.config.num_hidden_layers))
    return sd


def folder_to_single_file(
    folder: str,
    out: str,
    family: str,
    dtype=None,
    vae: bool = True,
    extra: dict | None = None,
    metadata: dict | None = None,
) -> str:
    """A diffusers folder written as one ``.safetensors`` checkpoint in the UI layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    v = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    parts = {
        "unet": (unet, dict(unet.config)),
        "vae": (v, dict(v.config)),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
    }
    if family == "sdxl":
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
    sd = pipeline_to_ldm(parts, family, vae=vae)
    sd.update(extra or {})
    sd = {k: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous() for k, t in sd.items()}
    save_file(sd, out, metadata=metadata or {"format": "pt"})
    return out


def meta_parts(family: str) -> dict:
    """The full-size modules of a built-in architecture, on the meta device (no memory)."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from reneg.backends.configs import architecture

    arch = architecture(family)
    with init_empty_weights():
        parts = {
            "unet": (UNet2DConditionModel.from_config(arch["unet"]), arch["unet"]),
            "vae": (AutoencoderKL.from_config(arch["vae"]), arch["vae"]),
        }
        for name in ("text_encoder", "text_encoder_2"):
            if name in arch:
                cls, cfg = arch[name]
                parts[name] = getattr(transformers, cls)(transformers.CLIPTextConfig.from_dict(cfg))
    return parts


_ST = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.float8_e4m3fn: "F8_E4M3",
}
_SIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.int64: 8, torch.float8_e4m3fn: 1}


def write_header_only(
    path: str,
    shapes: dict,
    dtype=torch.float16,
    metadata: dict | None = None,
    data: dict | None = None,
    truncate_to: int | None = None,
) -> str:
    """A safetensors file whose header lists ``shapes`` (name -> shape, or name -> (shape, dtype));
    the data region is a sparse hole of the full size, except the tensors given in ``data``."""
    header, off = {}, 0
    for k, s in shapes.items():
        shape, dt = s if isinstance(s, tuple) and len(s) == 2 and isinstance(s[1], torch.dtype) else (s, dtype)
        n = 1
        for d in shape:
            n *= d
        nbytes = n * _SIZE[dt]
        header[k] = {"dtype": _ST[dt], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        base = 8 + len(raw)
        for k, t in (data or {}).items():
            f.seek(base + header[k]["data_offsets"][0])
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
        f.truncate(truncate_to if truncate_to is not None else base + off)
    return path


def full_size_table(family: str, vae: bool = True) -> dict:
    """name -> shape of a full-size checkpoint of ``family`` in the UI layout."""
    return {
        k: tuple(v.shape) if v.is_floating_point() else (tuple(v.shape), v.dtype)
        for k, v in pipeline_to_ldm(meta_parts(family), family, vae=vae).items()
    }


def _wan_shared_name(k: str) -> str | None:
    """Wan's own name of a diffusers ``AutoencoderKLWan`` tensor both Wan VAE layouts keep alike (the
    quantisation convolutions, the heads, the middle blocks), or None for the down / up blocks."""
    from reneg.backends.single_file.wan_vae import FIXED, MIDDLE, RESIDUAL

    fixed = {v: k for k, v in FIXED.items()}
    if k in fixed:
        return fixed[k]
    p = k.split(".")
    if p[1] != "mid_block":
        return None
    res, mid = {v: k for k, v in RESIDUAL.items()}, {v: k for k, v in MIDDLE.items()}
    rest = ".".join(p[4:])
    return f"{p[0]}.middle.{mid[p[2] + '.' + p[3]]}.{res.get(rest, rest)}"


def vae_to_wan21(sd: dict, config: dict) -> dict:
    """A diffusers ``AutoencoderKLWan`` / ``AutoencoderKLQwenImage`` state dict in the Wan 2.1 VAE's own layout
    (``qwen_image_vae.safetensors``, ``wan_2.1_vae.safetensors``): the inverse of diffusers'
    ``convert_wan_vae_to_diffusers`` (the tests check the round trip against it at the released config). The
    decoder's levels are flattened back into one ``upsamples`` sequence: ``num_res_blocks + 1`` residual blocks
    per level, then the level's resampling block."""
    from reneg.backends.single_file.wan_vae import RESIDUAL

    res = {v: k for k, v in RESIDUAL.items()}
    per = int(config["num_res_blocks"]) + 1
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        name = _wan_shared_name(k)
        if name is not None:
            pass
        elif p[1] == "down_blocks":
            rest = ".".join(p[3:])
            name = f"encoder.downsamples.{p[2]}.{res.get(rest, rest)}"
        elif p[1] == "up_blocks":
            level = int(p[2])
            i = level * (per + 1) + (int(p[4]) if p[3] == "resnets" else per)
            rest = ".".join(p[5:])
            name = f"decoder.upsamples.{i}.{res.get(rest, rest)}"
        else:
            raise KeyError(f"not a Wan VAE tensor: {k}")
        out[name] = v
    return out


def vae_to_wan22(sd: dict) -> dict:
    """A diffusers ``AutoencoderKLWan(is_residual=True)`` state dict in Wan 2.2's own VAE layout
    (``wan2.2_vae.safetensors``): each level a block of its own, ``encoder.downsamples.I.downsamples.J`` (its residual
    blocks ``J = 0..``, then its resampling block), ``decoder.upsamples.I.upsamples.J`` likewise; the middle blocks,
    the heads and the quantisation convolutions as in Wan 2.1's layout. The inverse of the loader's
    ``wan22_vae_to_diffusers``; the names are checked against ComfyUI's own ``WanVAE`` (``comfy/ldm/wan/vae2_2.py``)
    in ``tests/test_wan_ti2v_files.py``."""
    from reneg.backends.single_file.wan_vae import RESIDUAL

    res = {v: k for k, v in RESIDUAL.items()}
    per: dict[tuple[str, int], int] = {}  # residual blocks per level: the resampling block comes after them
    for k in sd:
        p = k.split(".")
        if p[1] in ("down_blocks", "up_blocks") and p[3] == "resnets":
            per[p[0], int(p[2])] = max(per.get((p[0], int(p[2])), 0), int(p[4]) + 1)
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        name = _wan_shared_name(k)
        if name is not None:
            pass
        elif p[1] in ("down_blocks", "up_blocks"):
            seq = "downsamples" if p[0] == "encoder" else "upsamples"
            if p[3] == "resnets":
                j, rest = p[4], ".".join(p[5:])
                rest = res.get(rest, rest)
            elif p[3] in ("downsampler", "upsampler"):
                j, rest = per[p[0], int(p[2])], ".".join(p[4:])
            else:
                raise KeyError(f"not a Wan 2.2 VAE tensor: {k}")
            name = f"{p[0]}.{seq}.{p[2]}.{seq}.{j}.{rest}"
        else:
            raise KeyError(f"not a Wan 2.2 VAE tensor: {k}")
        out[name] = v
    return out


# diffusers' WanTransformer3DModel names and Wan's own, in the order they are put back
_WAN_TRANSFORMER = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"),
    ("attn2", "cross_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
)


def transformer_to_wan(sd: dict) -> dict:
    """A diffusers ``WanTransformer3DModel`` state dict in Wan's own layout (ComfyUI's ``models/diffusion_models``
    files): the inverse of diffusers' ``convert_wan_transformer_to_diffusers`` for text-to-video transformers
    (the tests check the round trip against it), including its swap of ``norm2`` and ``norm3``."""
    out = {}
    for k, v in sd.items():
        n = k
        for new, old in _WAN_TRANSFORMER:
            n = n.replace(new, old)
        if n == "scale_shift_table":
            n = "head.modulation"
        n = n.replace(".scale_shift_table", ".modulation")
        n = n.replace(".norm2.", ".norm__swap.").replace(".norm3.", ".norm2.").replace(".norm__swap.", ".norm3.")
        out[n] = v
    return out


def to_scaled_fp8(sd: dict, skip=("shared.", "embed", "spiece_model")) -> dict:
    """``sd`` as ComfyUI's ``*_fp8_e4m3fn_scaled`` files keep it: each 2-d linear weight in float8 (e4m3fn) divided
    by its own float32 ``scale_weight`` (its largest magnitude over float8's 448), other tensors as they are, and
    the ``scaled_fp8`` marker tensor."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 2 and v.is_floating_point() and not any(s in k for s in skip):
            scale = (v.float().abs().max() / 448.0).clamp(min=1e-12)
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out
