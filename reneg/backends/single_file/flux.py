"""Flux.1's single files as ComfyUI keeps them, named from their keys and shapes.

ComfyUI loads Flux.1 from separate files: the transformer in ``models/diffusion_models/`` (the Black
Forest Labs layout: ``img_in``, ``txt_in``, ``vector_in``, ``double_blocks.N``, ``single_blocks.N``,
``guidance_in`` for dev), the two text encoders in ``models/text_encoders/`` (``clip_l``: a transformers
``CLIPTextModel``, ``text_model.*``; ``t5xxl``: a transformers ``T5EncoderModel``, ``encoder.block.N``,
``shared``) and the autoencoder ``ae`` in ``models/vae/`` (the LDM layout, ``encoder.down.N`` /
``decoder.up.N``, 16 latent channels); or from one checkpoint holding them under
``model.diffusion_model.``, ``text_encoders.clip_l.``, ``text_encoders.t5xxl.`` and ``vae.``.
:func:`flux_part` tells which of these a file is, as ComfyUI's ``model_detection.py`` (the transformer:
``double_blocks.0.img_attn.norm.key_norm.scale`` with ``img_in.weight``; dev when
``guidance_in.in_layer.weight`` is there) and ``sd.py`` (the text encoders) tell them apart.

ReNeg reads Flux from a diffusers ``FluxPipeline`` folder (:mod:`reneg.backends.flux`) or from these
files together (:func:`load_flux_files`: the transformer as ``--model`` with ``--text-encoder`` and
``--vae``); they carry no tokenizers: CLIP's ships with ReNeg, T5's is ComfyUI's own (found beside the
files) or ``--tokenizer``. ``reneg inspect`` describes each file; a part given alone as ``--model`` is
refused with a message that says what to give.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch

from ..diffusers_backend import ModelLoadError
from .read import Checkpoint

TRANSFORMER_PREFIXES = ("", "model.diffusion_model.")
T5_KEY = "encoder.block.0.layer.0.SelfAttention.q.weight"
CLIP_KEY = "text_model.encoder.layers.0.self_attn.q_proj.weight"
UMT5_KEY = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
# where ComfyUI keeps each part
FOLDERS = {
    "transformer": "models/diffusion_models",
    "clip_l": "models/text_encoders",
    "t5xxl": "models/text_encoders",
    "ae": "models/vae",
    "checkpoint": "models/checkpoints",
}


@dataclass
class FluxPart:
    path: str
    part: str  # transformer | clip_l | t5xxl | ae | checkpoint (all four in one file)
    description: str
    details: dict = field(default_factory=dict)
    family: str = ""  # flux-dev / flux-schnell for a transformer or a checkpoint
    size: int = 0

    def to_json(self) -> dict:
        return dict(asdict(self), architecture="Flux.1", comfyui_folder=FOLDERS[self.part])

    def refusal(self) -> str:
        """The loaders' one line for this file: what it is and what ReNeg takes instead."""
        also = f"; {SHARED[self.part]}" if self.part in SHARED else ""
        return f"{self.path}: {self.description}, one part of a model on its own; ReNeg {REFUSAL}{also}"

    def describe(self) -> list[str]:
        lines = [self.path, f"  Flux.1 part   {self.description}"]
        lines += [f"  {k:<13} {v}" for k, v in self.details.items()]
        lines.append(f"  ComfyUI keeps it in {FOLDERS[self.part]}/")
        lines.append(f"  ReNeg         {REFUSAL}")
        if self.part in SHARED:
            lines.append(f"                {SHARED[self.part]}")
        return lines


REFUSAL = (
    "trains and tunes Flux.1 from a diffusers FluxPipeline folder, or from these files together: the "
    "transformer as --model, --text-encoder clip_l --text-encoder t5xxl, --vae ae (T5's tokenizer: ComfyUI's "
    "own when the files are inside a ComfyUI folder, else --tokenizer FOLDER); in ComfyUI the Load ReNeg "
    "Embedding node works with the model ComfyUI loads from these files"
)


# parts other models read too: what ReNeg takes for those models instead
SHARED = {
    "t5xxl": "Chroma: a diffusers ChromaPipeline folder, or its transformer file as --model with this file as "
    "--text-encoder and --vae ae; PixArt: a PixArtAlphaPipeline / PixArtSigmaPipeline folder",
    "ae": "Chroma: a diffusers ChromaPipeline folder, or its transformer file as --model with this file as --vae",
}


def _count(ck: Checkpoint, prefix: str) -> int:
    n = set()
    for k in ck.keys():
        if k.startswith(prefix):
            head = k[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                n.add(int(head))
    return max(n) + 1 if n else 0


def _transformer(ck: Checkpoint, prefix: str) -> tuple[str, dict] | None:
    if prefix + "double_blocks.0.img_attn.norm.key_norm.scale" not in ck or prefix + "img_in.weight" not in ck:
        return None
    if any(k.startswith(prefix + "distilled_guidance_layer.") for k in ck.keys()):
        return None  # Chroma: Flux's layout with its own guidance layer
    hidden, in_ch = ck.shapes[prefix + "img_in.weight"]
    family = "flux-dev" if prefix + "guidance_in.in_layer.weight" in ck else "flux-schnell"
    vec = ck.shapes.get(prefix + "vector_in.in_layer.weight")
    txt = ck.shapes.get(prefix + "txt_in.weight")
    head = ck.shapes.get(prefix + "double_blocks.0.img_attn.norm.key_norm.scale", (128,))[0]
    dtypes = {str(ck.dtypes[k]).replace("torch.", "") for k in ck.keys() if k.startswith(prefix + "double_blocks.")}
    details = {
        "variant": f"{family} ({'guidance embedding' if family == 'flux-dev' else 'no guidance embedding'})",
        "blocks": f"{_count(ck, prefix + 'double_blocks.')} double-stream, {_count(ck, prefix + 'single_blocks.')} "
        f"single-stream, {hidden} wide ({int(hidden) // int(head)} heads of {head})",
        "reads": f"{in_ch // 4} latent channels in 2x2 patches; T5 rows {txt[1] if txt else '?'} wide; "
        f"a pooled vector of {vec[1] if vec else '?'}",
        "weights": ", ".join(sorted(dtypes)) or "?",
    }
    return family, details


def flux_part(ck: Checkpoint) -> FluxPart | None:
    """What Flux.1 part ``ck`` is, or None when it is none of them."""
    size = os.path.getsize(ck.path) if os.path.isfile(ck.path) else 0
    keys = list(ck.keys())
    if any(k.startswith("text_encoders.t5xxl.") for k in keys) and any(k.startswith("vae.") for k in keys):
        found = _transformer(ck, "model.diffusion_model.")
        if found:
            family, details = found
            return FluxPart(ck.path, "checkpoint", "a whole Flux.1 checkpoint (transformer, clip_l, t5xxl, ae)",
                            details, family, size)  # fmt: skip
    for prefix in TRANSFORMER_PREFIXES:
        found = _transformer(ck, prefix)
        if found:
            family, details = found
            return FluxPart(ck.path, "transformer", f"the {family} transformer (Black Forest Labs layout)",
                            details, family, size)  # fmt: skip
    if T5_KEY in ck and "shared.weight" in ck and UMT5_KEY not in ck:  # (UMT5, Wan's, has a bias in every layer)
        vocab, width = ck.shapes["shared.weight"]
        if int(width) != 4096:
            return None
        layers = _count(ck, "encoder.block.")
        scaled = "scaled_fp8" in ck
        details = {"encoder": f"T5 v1.1 XXL, {layers} layers, {width} wide, vocabulary {vocab}"}
        details["weights"] = "fp8 with scales (scaled_fp8)" if scaled else str(ck.dtypes[T5_KEY]).replace("torch.", "")
        return FluxPart(
            ck.path,
            "t5xxl",
            "the T5-XXL text encoder (t5xxl): the rows of Flux.1, Chroma, PixArt-alpha and PixArt-Sigma",
            details,
            size=size,
        )
    if CLIP_KEY in ck and "text_model.embeddings.token_embedding.weight" in ck:
        vocab, width = ck.shapes["text_model.embeddings.token_embedding.weight"]
        if int(width) != 768:
            return None
        details = {
            "encoder": f"CLIP ViT-L/14 text model, {_count(ck, 'text_model.encoder.layers.')} layers, {width} wide"
        }
        return FluxPart(ck.path, "clip_l", "the CLIP-L text encoder (clip_l): Flux's pooled vector", details, size=size)
    conv = ck.shapes.get("decoder.conv_in.weight")
    if conv is not None and "encoder.down.0.block.0.conv1.weight" in ck and int(conv[1]) == 16:
        details = {"latent": "16 channels, 8x downsampling (the LDM layout)"}
        return FluxPart(ck.path, "ae", "the 16-channel autoencoder (ae) of Flux.1 and Chroma", details, size=size)
    return None


def bfl_to_diffusers(sd: dict, hidden: int) -> dict:
    """A Flux (or Chroma) transformer's state dict from the Black Forest Labs layout to diffusers' (the
    mapping of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` and
    ``convert_chroma_transformer_checkpoint_to_diffusers``, which fix the width at the releases' 3072; here
    it is the file's: slow tests check they agree bit for bit at 3072)."""
    sd, out = dict(sd), {}

    def move(src: str, dst: str, fn=None) -> None:
        for suffix in (".weight", ".bias"):
            if src + suffix in sd:
                v = sd.pop(src + suffix)
                out[dst + suffix] = fn(v) if fn else v

    def swap_scale_shift(v):  # the original's final modulation is (shift, scale); diffusers' (scale, shift)
        shift, scale = v.chunk(2, dim=0)
        return torch.cat([scale, shift], dim=0)

    for src, dst in (
        ("time_in", "timestep_embedder"),
        ("vector_in", "text_embedder"),
        ("guidance_in", "guidance_embedder"),
    ):
        move(f"{src}.in_layer", f"time_text_embed.{dst}.linear_1")
        move(f"{src}.out_layer", f"time_text_embed.{dst}.linear_2")
    move("txt_in", "context_embedder")
    move("img_in", "x_embedder")
    # Chroma: the approximator that makes every block's modulations (in place of Flux's per-block ones)
    move("distilled_guidance_layer.in_proj", "distilled_guidance_layer.in_proj")
    move("distilled_guidance_layer.out_proj", "distilled_guidance_layer.out_proj")
    for i in range(_count_keys(sd, "distilled_guidance_layer.layers.")):
        move(f"distilled_guidance_layer.layers.{i}.in_layer", f"distilled_guidance_layer.layers.{i}.linear_1")
        move(f"distilled_guidance_layer.layers.{i}.out_layer", f"distilled_guidance_layer.layers.{i}.linear_2")
        out[f"distilled_guidance_layer.norms.{i}.weight"] = sd.pop(f"distilled_guidance_layer.norms.{i}.scale")
    for i in range(_count_keys(sd, "double_blocks.")):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        move(b + "img_mod.lin", d + "norm1.linear")
        move(b + "txt_mod.lin", d + "norm1_context.linear")
        for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for suffix in (".weight", ".bias"):
                for name, part in zip(names, sd.pop(f"{b}{stream}_attn.qkv{suffix}").chunk(3, dim=0)):
                    out[f"{d}attn.{name}{suffix}"] = part
        for stream, (q, k) in (("img", ("norm_q", "norm_k")), ("txt", ("norm_added_q", "norm_added_k"))):
            out[f"{d}attn.{q}.weight"] = sd.pop(f"{b}{stream}_attn.norm.query_norm.scale")
            out[f"{d}attn.{k}.weight"] = sd.pop(f"{b}{stream}_attn.norm.key_norm.scale")
        move(b + "img_mlp.0", d + "ff.net.0.proj")
        move(b + "img_mlp.2", d + "ff.net.2")
        move(b + "txt_mlp.0", d + "ff_context.net.0.proj")
        move(b + "txt_mlp.2", d + "ff_context.net.2")
        move(b + "img_attn.proj", d + "attn.to_out.0")
        move(b + "txt_attn.proj", d + "attn.to_add_out")
    for i in range(_count_keys(sd, "single_blocks.")):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        move(b + "modulation.lin", d + "norm.linear")
        for suffix in (".weight", ".bias"):
            w = sd.pop(f"{b}linear1{suffix}")
            parts = torch.split(w, (hidden, hidden, hidden, w.shape[0] - 3 * hidden), dim=0)
            for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts):
                out[f"{d}{name}{suffix}"] = part
        out[f"{d}attn.norm_q.weight"] = sd.pop(f"{b}norm.query_norm.scale")
        out[f"{d}attn.norm_k.weight"] = sd.pop(f"{b}norm.key_norm.scale")
        move(b + "linear2", d + "proj_out")
    move("final_layer.linear", "proj_out")
    move("final_layer.adaLN_modulation.1", "norm_out.linear", swap_scale_shift)
    return {**out, **sd}  # anything left is reported by the loader as not the model's


def _count_keys(sd: dict, prefix: str) -> int:
    n = {
        int(k[len(prefix) :].split(".", 1)[0])
        for k in sd
        if k.startswith(prefix) and k[len(prefix) :].split(".", 1)[0].isdigit()
    }
    return max(n) + 1 if n else 0


# ComfyUI keeps T5's tokenizer in its own source tree; a transformer file inside a ComfyUI folder finds it there
COMFY_T5_TOKENIZER = os.path.join("comfy", "text_encoders", "t5_tokenizer")


def require_t5_tokenizer(path: str, text_encoders, tokenizer: str | None, folder_hint: str) -> str:
    """T5's tokenizer folder for ``path``'s model: ``tokenizer`` (``--tokenizer``), else the ComfyUI's own
    that holds the files; a one-line error that says what to pass where there is none."""
    found = tokenizer or find_t5_tokenizer(path, *(text_encoders or ()))
    if not found:
        raise ModelLoadError(
            f"{path}: T5's tokenizer is not in these files; pass --tokenizer FOLDER (ComfyUI's "
            f"{COMFY_T5_TOKENIZER}/, or {folder_hint}), found by itself when the files sit inside a ComfyUI folder"
        )
    return found


def find_t5_tokenizer(*paths: str) -> str | None:
    """The T5 tokenizer folder of the ComfyUI installation that holds one of ``paths`` (a model file under
    ``ComfyUI/models/...``), or None."""
    return find_in_comfyui(COMFY_T5_TOKENIZER, *paths)


def find_in_comfyui(relative: str, *paths: str) -> str | None:
    """``relative`` (a folder of ComfyUI's source tree, such as a tokenizer it ships) in the ComfyUI
    installation that holds one of ``paths``, looked for up to six folders above each file; or None."""
    for p in paths:
        d = os.path.dirname(os.path.abspath(p))
        for _ in range(6):
            cand = os.path.join(d, relative)
            if os.path.isdir(cand):
                return cand
            d = os.path.dirname(d)
    return None


def bfl_config(ck: Checkpoint, prefix: str) -> dict:
    """A diffusers transformer config from a Black Forest Labs-layout file's shapes, what Flux.1 and Chroma
    share (the releases: 3072 wide, heads of 128, 19 + 38 blocks, rotary axes 16/56/56 of each head's
    128); Flux's pooled vector and guidance embedding where the file has them."""
    hidden, in_ch = (int(x) for x in ck.shapes[prefix + "img_in.weight"])
    head = int(ck.shapes[prefix + "double_blocks.0.img_attn.norm.query_norm.scale"][0])
    if head % 16:
        raise ModelLoadError(f"{ck.path}: attention heads of {head} (the releases' are 128): not this layout")
    cfg = {
        "patch_size": 1,
        "in_channels": in_ch,
        "num_layers": _count(ck, prefix + "double_blocks."),
        "num_single_layers": _count(ck, prefix + "single_blocks."),
        "attention_head_dim": head,
        "num_attention_heads": hidden // head,
        "joint_attention_dim": int(ck.shapes[prefix + "txt_in.weight"][1]),
        "axes_dims_rope": (head // 8, 7 * head // 16, 7 * head // 16),
    }
    if prefix + "vector_in.in_layer.weight" in ck:  # Flux.1
        cfg["pooled_projection_dim"] = int(ck.shapes[prefix + "vector_in.in_layer.weight"][1])
        cfg["guidance_embeds"] = prefix + "guidance_in.in_layer.weight" in ck
    return cfg


def _ae_config(ck: Checkpoint, prefix: str) -> dict:
    """An ``AutoencoderKL`` config for Flux's ``ae`` from its shapes (the release: 128/256/512/512 wide, 2
    ResNet blocks a level, 16 latent channels, groups of 32, scaling 0.3611, shift 0.1159, no quant convs).
    The group count is not in the file: the release's 32 where every width allows it, else 8."""
    levels = _count(ck, prefix + "encoder.down.")
    widths = [int(ck.shapes[prefix + f"encoder.down.{i}.block.0.conv2.weight"][0]) for i in range(levels)]
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": int(ck.shapes[prefix + "decoder.conv_in.weight"][1]),
        "block_out_channels": widths,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": _count(ck, prefix + "encoder.down.0.block."),
        "norm_num_groups": 32 if all(w % 32 == 0 for w in widths) else 8,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


def _t5(ck: Checkpoint, prefix: str, dtype, umt5: bool = False):
    """transformers' ``T5EncoderModel`` (``umt5``: ``UMT5EncoderModel``, Wan's, a relative attention bias in every
    layer) from a file in transformers' names under ``prefix``: the configuration from the shapes (width, heads,
    feed-forward, layers, vocabulary, position buckets) with the v1.1 encoders' fixed parts (gated GELU, eps
    1e-6; UMT5's positions up to 128). A SentencePiece model kept inside (ComfyUI's ``spiece_model``) is not a
    weight."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    from .build import _empty_weights, _fill

    q = ck.shapes[prefix + T5_KEY]
    bias = ck.shapes[prefix + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    heads = int(bias[1])
    vocab, width = (int(x) for x in ck.shapes[prefix + "shared.weight"])
    config = (UMT5Config if umt5 else T5Config)(
        vocab_size=vocab,
        d_model=width,
        d_kv=int(q[0]) // heads,
        d_ff=int(ck.shapes[prefix + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0]),
        num_layers=_count(ck, prefix + "encoder.block."),
        num_heads=heads,
        relative_attention_num_buckets=int(bias[0]),
        **({"relative_attention_max_distance": 128} if umt5 else {}),
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        tie_word_embeddings=False,
    )
    with _empty_weights():
        model = (UMT5EncoderModel if umt5 else T5EncoderModel)(config)
    sd = {k[len(prefix) :]: v for k, v in ck.subset(prefix, dtype).items() if k != prefix + "spiece_model"}
    if "encoder.embed_tokens.weight" in model.state_dict() and "encoder.embed_tokens.weight" not in sd:
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    return _fill(model, sd, ck.path, "UMT5-XXL text encoder" if umt5 else "T5-XXL text encoder")


def _clip(ck: Checkpoint, prefix: str, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..configs import architecture
    from .build import _empty_weights, _fill

    # CLIP ViT-L/14's text tower (12 heads of 64, quick GELU); the depth and feed-forward width from the file
    config = CLIPTextConfig.from_dict(dict(architecture("sd1")["text_encoder"][1]))
    config.num_hidden_layers = _count(ck, prefix + "text_model.encoder.layers.")
    config.intermediate_size = int(ck.shapes[prefix + "text_model.encoder.layers.0.mlp.fc1.weight"][0])
    with _empty_weights():
        model = CLIPTextModel(config)
    sd = {k[len(prefix) :]: v for k, v in ck.subset(prefix, dtype).items() if not k.endswith("text_projection.weight")}
    return _fill(model, sd, ck.path, "CLIP-L text encoder")


def load_flux_files(
    path: str,
    text_encoders: list[str] | tuple = (),
    vae: str | None = None,
    tokenizer: str | None = None,
    device="cpu",
    dtype=None,
):
    """A :class:`reneg.backends.flux.FluxBackend` from the files a ComfyUI user holds: the transformer file
    (``path``; or one checkpoint with all four parts), ``clip_l`` and ``t5xxl`` (``text_encoders``, either
    order), ``ae`` (``vae``; a diffusers VAE folder also does) and T5's tokenizer (``tokenizer``: a folder;
    by default ComfyUI's own, found beside the files). The transformer is converted with diffusers' own
    ``convert_flux_transformer_checkpoint_to_diffusers`` mapping (:func:`bfl_to_diffusers`); every part is
    checked against its shapes."""

    from .read import open_checkpoint

    dtype = dtype or torch.float32
    ck = open_checkpoint(path)
    part = flux_part(ck)
    if part is None or part.part not in ("transformer", "checkpoint"):
        what = part.description if part else "not a Flux.1 transformer"
        raise ModelLoadError(f"{path}: {what}; give the Flux.1 transformer file as --model")
    whole = part.part == "checkpoint"
    tprefix = "model.diffusion_model." if whole else next(p for p in TRANSFORMER_PREFIXES if _transformer(ck, p))

    # the parts: from the one checkpoint, or one file each
    found: dict[str, tuple[Checkpoint, str]] = {}
    if whole:  # ComfyUI's whole checkpoints keep each encoder under text_encoders.NAME.transformer.
        for name in ("clip_l", "t5xxl"):
            inner = f"text_encoders.{name}.transformer."
            found[name] = (ck, inner if any(k.startswith(inner) for k in ck.keys()) else f"text_encoders.{name}.")
        if not vae:
            found["ae"] = (ck, "vae.")
    for te in text_encoders or ():
        tck = open_checkpoint(te)
        tpart = flux_part(tck)
        if tpart is None or tpart.part not in ("clip_l", "t5xxl"):
            what = tpart.description if tpart else "neither CLIP-L (clip_l) nor T5-XXL (t5xxl)"
            raise ModelLoadError(f"--text-encoder {te}: {what}; Flux.1 reads clip_l and t5xxl")
        if tpart.part in found and found[tpart.part][0] is not ck:
            raise ModelLoadError(
                f"--text-encoder {te}: a second {tpart.part} file (the first: {found[tpart.part][0].path})"
            )
        found[tpart.part] = (tck, "")
    missing = [p for p in ("clip_l", "t5xxl") if p not in found]
    if missing:
        raise ModelLoadError(
            f"{path}: a Flux.1 transformer file needs its text encoders: pass --text-encoder FILE for "
            f"{' and '.join(missing)} (ComfyUI keeps them in models/text_encoders/: clip_l.safetensors, "
            "t5xxl_fp16.safetensors)"
        )
    if not vae and "ae" not in found:
        raise ModelLoadError(f"{path}: a Flux.1 transformer file needs its autoencoder: pass --vae FILE "
                             "(ComfyUI keeps it as models/vae/ae.safetensors)")  # fmt: skip

    tok_dir = require_t5_tokenizer(path, text_encoders, tokenizer, "a FluxPipeline folder's tokenizer_2/")
    try:
        return _load_parts(path, ck, tprefix, found, vae, tok_dir, part.family, device, dtype)
    except KeyError as e:  # a tensor the shapes are read from is not there: the file is not what it says
        raise ModelLoadError(
            f"{path}: a Flux.1 part lacks the tensor {e.args[0]} (a damaged or cut-down file)"
        ) from None


def _load_parts(path, ck, tprefix, found, vae, tok_dir, family, device, dtype):
    from diffusers import FluxTransformer2DModel

    from ..flux import SCHEDULERS, build_backend
    from ..parts import load_t5_tokenizer
    from .build import _empty_weights, _fill, _tokenizer, build_vae, load_vae
    from .read import open_checkpoint

    cfg = bfl_config(ck, tprefix)
    sd = bfl_to_diffusers({k[len(tprefix) :]: v for k, v in ck.subset(tprefix, dtype).items()},
                          cfg["num_attention_heads"] * cfg["attention_head_dim"])  # fmt: skip
    with _empty_weights():
        transformer = FluxTransformer2DModel.from_config(cfg)
    transformer = _fill(transformer, sd, path, "Flux transformer")
    clip = _clip(*found["clip_l"], dtype)
    t5 = _t5(*found["t5xxl"], dtype)
    if vae and os.path.isdir(vae):
        ae = load_vae(vae, dtype)
    else:
        ack, aprefix = found.get("ae") or (open_checkpoint(vae), "")
        apart = flux_part(ack) if aprefix == "" else None
        if aprefix == "" and (apart is None or apart.part != "ae"):
            raise ModelLoadError(f"--vae {vae}: not Flux's 16-channel autoencoder (ae)")
        ae = build_vae(ack, _ae_config(ack, aprefix), dtype, source=f"--vae {ack.path}" if not aprefix else path)
    info = {
        "source": path,
        "kind": "single files (ComfyUI)",
        "text_encoders": [c.path for c, _ in (found["clip_l"], found["t5xxl"])],
        "vae": vae or "inside",
        "tokenizer": tok_dir,
    }
    return build_backend(
        transformer, ae, clip, _tokenizer("<|endoftext|>"), t5, load_t5_tokenizer(tok_dir),
        SCHEDULERS[family], path, device, dtype, info,
    )  # fmt: skip
