"""Tiny models built from small fixed configs, saved in the real file layouts: for tests and benchmarks.

No production code imports this module. The Stable Diffusion folder and the HPS-format reward are
:mod:`reneg.demo_fallback`'s (``--demo`` builds them when the demo world's assets are missing) and are
re-exported here; this module adds the models only tests and benchmarks use: an SDXL-architecture
folder, PixArt-alpha/-sigma folders with a small T5 tokenizer, and a ZeroScope-style text-to-video
folder. They load through exactly the code paths users' files take. Random weights: they prove the
machinery, not the method (the demo world in :mod:`reneg.demo_world` does that).

Of the three look-alikes: this module builds random-weight models for tests and benchmarks;
:mod:`reneg.demo_world` holds the shipped *trained* demo models; :mod:`reneg.demo` sets up a
``--demo`` run on one of the two.
"""

from __future__ import annotations

import os

import torch

from .backends.clip_tokenizer import write_clip_tokenizer
from .backends.chroma import SCHEDULER as CHROMA_RELEASE_SCHEDULER
from .backends.flux import SCHEDULERS as FLUX_RELEASE_SCHEDULERS
from .backends.qwen_image import SCHEDULER as QWEN_SCHEDULER
from .backends.single_file.wan_vae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD
from .backends.wan import SCHEDULER as WAN_RELEASE_SCHEDULER
from .backends.wan import TI2V_FLOW_SHIFT as WAN_TI2V_FLOW_SHIFT
from .demo_fallback import (
    SD_MODEL_INDEX,
    SD_SCHEDULER,
    TINY_CLIP_CONFIG,
    build_tiny_hps,
    build_tiny_pipeline,
    save_text_encoder_prefixed,
    tiny_clip,
    tiny_unet_blocks,
    tiny_vae,
    write_pipeline_files,
)

__all__ = [
    "PIXART_SCHEDULER",
    "QWEN_IMAGE_SCHEDULER",
    "SD_MODEL_INDEX",
    "SD_SCHEDULER",
    "TINY_CLIP_CONFIG",
    "CHROMA_SCHEDULER",
    "FLUX_SCHEDULERS",
    "bfl_chroma_state_dict",
    "bfl_flux_state_dict",
    "build_tiny_chroma",
    "build_tiny_flux",
    "build_tiny_hps",
    "build_tiny_pipeline",
    "build_tiny_pixart",
    "build_tiny_qwen_image",
    "build_tiny_sdxl",
    "build_tiny_text_to_video",
    "build_tiny_wan",
    "save_text_encoder_prefixed",
    "write_clip_tokenizer",
    "write_pipeline_files",
    "write_qwen2_tokenizer",
    "write_t5_tokenizer",
]


def tiny_t5(
    tokenizer_dir: str,
    tokens: int,
    width: int = 4096,
    umt5: bool = False,
    d_kv: int = 8,
    d_ff: int = 32,
    layers: int = 1,
    heads: int = 2,
):
    """A small T5 v1.1-architecture encoder (``umt5``: UMT5, Wan's) at ``width`` (4096: T5-XXL's, the
    width the models read), with its tokenizer written to ``tokenizer_dir`` for ``tokens`` tokens; the
    vocabulary is the small tokenizer's. The real encoders' relative attention, gated-GELU feed-forward,
    RMS norm, pad 0 and end token 1."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    write_t5_tokenizer(tokenizer_dir, tokens)
    config, model = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    return model(
        config(
            vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)),
            d_model=width,
            d_kv=d_kv,
            d_ff=d_ff,
            num_layers=layers,
            num_heads=heads,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            layer_norm_epsilon=1e-6,
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def tiny_flux_ae():
    """A small 16-channel autoencoder with the layout, scaling and shift of the ``ae`` Flux.1 and Chroma
    share (no quant convs; 8x would be the real one's downsampling, 2x here)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_tiny_sdxl(folder: str, seed: int = 0, sample_size: int = 8) -> str:
    """A small SDXL-architecture diffusers folder with SDXL's real conditioning sizes.

    Two text encoders (hidden 768 and 1280, two layers each, real CLIP tokenizers, the
    second padding with ``!`` and projecting a 1280 pooled vector), a UNet that reads
    their 2048-wide concatenation plus the pooled vector and six size numbers
    (``addition_embed_type="text_time"``), so embeddings made with it are ``sdxl``
    files. About 420 MB on disk, almost all of it the two token tables."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=1280 + 6 * time_dim,
        **tiny_unet_blocks(),
    )
    vae = tiny_vae(sample_size * 2, scaling_factor=0.13025, force_upcast=True)
    te = tiny_clip(768, 12, projection_dim=768)
    te2 = tiny_clip(1280, 20, cls=CLIPTextModelWithProjection, projection_dim=1280, hidden_act="gelu", pad_token_id=0)
    os.makedirs(folder, exist_ok=True)
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    save_text_encoder_prefixed(te, os.path.join(folder, "text_encoder"))
    save_text_encoder_prefixed(te2, os.path.join(folder, "text_encoder_2"))
    write_clip_tokenizer(os.path.join(folder, "tokenizer"))
    write_clip_tokenizer(os.path.join(folder, "tokenizer_2"), pad_token="!")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "force_zeros_for_empty_prompt": True,
    }
    write_pipeline_files(folder, dict(SD_SCHEDULER, _class_name="EulerDiscreteScheduler"), index)
    return folder


PIXART_SCHEDULER = {  # the scheduler config PixArt-alpha and PixArt-sigma folders ship
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}

_T5_WORDS = (
    "a the of and in on with at by for to is an red blue green yellow black white circle square "
    "photo portrait painting cat dog house tree sky city street man woman girl boy car flower "
    "blurry ugly low quality bad deformed distorted"
).split()


def write_t5_tokenizer(folder: str, max_length: int) -> None:
    """A transformers ``T5Tokenizer`` folder (``tokenizer.json``) with T5's special-token layout
    (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2; ``</s>`` appended; SentencePiece-style ``▁`` word starts)
    and a small unigram vocabulary: a few hundred pieces instead of T5's 32,128, built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789,.!?'-")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    for p, score in (
        [("\u2581" + w, -3.0) for w in _T5_WORDS] + [(c, -5.0) for c in chars] + [("\u2581" + c, -5.5) for c in chars]
    ):
        if p not in seen:
            seen.add(p)
            pieces.append((p, score))
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    t5.model_max_length = max_length
    t5.save_pretrained(folder)


def build_tiny_pixart(
    folder: str,
    seed: int = 0,
    sigma: bool = False,
    size_cond: bool = True,
    prediction_type: str = "epsilon",
    t5_width: int = 4096,
) -> str:
    """A small PixArt-architecture diffusers folder with PixArt's real conditioning sizes.

    Real: the pipeline class and folder layout, T5's width 4096 (``caption_channels`` 4096, so
    the authors' ``[1, 120, 4096]`` file fits), the token count (alpha 120, sigma 300) with padding
    and attention mask, T5 v1.1's architecture (gated GELU, relative position buckets, RMS norm),
    the learned-sigma output (8 channels for 4 latent ones), the 1024-px alpha transformer's size
    conditioning (``sample_size`` 128, ``use_additional_conditions``; off for sigma), the scheduler
    config. Small: one T5 layer with two 8-wide heads, a vocabulary of a few hundred pieces, a
    one-layer transformer 24 wide, a two-level VAE (16 px images, 8 px latents)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    tokens = 300 if sigma else 120
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=24,
        attention_bias=True,
        sample_size=128,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=t5_width,
        interpolation_scale=2 if sigma else None,
        use_additional_conditions=size_cond and not sigma,
    )
    vae = tiny_vae(16, scaling_factor=0.13025 if sigma else 0.18215)
    os.makedirs(folder, exist_ok=True)
    te = tiny_t5(os.path.join(folder, "tokenizer"), tokens, t5_width)
    transformer.save_pretrained(os.path.join(folder, "transformer"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    te.save_pretrained(os.path.join(folder, "text_encoder"))
    index = {
        "_class_name": "PixArtSigmaPipeline" if sigma else "PixArtAlphaPipeline",
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    }
    write_pipeline_files(folder, dict(PIXART_SCHEDULER, prediction_type=prediction_type), index)
    return folder


def build_tiny_text_to_video(folder: str, seed: int = 0, hidden: int = 1024, sample_size: int = 8) -> str:
    """A small ZeroScope-architecture ``TextToVideoSDPipeline`` folder: a ``UNet3DConditionModel``
    (two blocks, temporal convolutions and attention) reading a ``CLIPTextModel`` of SD2.1's width
    1024 (two layers, the real CLIP tokenizer padding with ``!`` as SD2's does), ZeroScope's DDIM
    scheduler config. About 210 MB on disk, almost all of it the token table."""
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    unet = UNet3DConditionModel(sample_size=sample_size, cross_attention_dim=hidden, **tiny_unet_blocks("3D"))
    vae = tiny_vae(sample_size * 2)
    te = tiny_clip(hidden, 16, projection_dim=hidden, hidden_act="gelu", pad_token_id=0)
    os.makedirs(folder, exist_ok=True)
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    save_text_encoder_prefixed(te, os.path.join(folder, "text_encoder"))
    write_clip_tokenizer(os.path.join(folder, "tokenizer"), pad_token="!")
    index = {k: v for k, v in SD_MODEL_INDEX.items() if "safety" not in k and k != "feature_extractor"}
    index.update(_class_name="TextToVideoSDPipeline", unet=["diffusers", "UNet3DConditionModel"])
    write_pipeline_files(folder, SD_SCHEDULER, index)
    return folder


# Wan's scheduler config as the Wan 2.1 / 2.2 diffusers folders ship it (UniPC on flow sigmas, shift 3 for 480p)
WAN_SCHEDULER = WAN_RELEASE_SCHEDULER  # the one the single-file loader uses


def build_tiny_wan(
    folder: str,
    seed: int = 0,
    experts: int = 1,
    boundary_ratio: float = 0.875,
    layers: int = 1,
    real_widths: bool = False,
    head_dim: int | None = None,
    ti2v: bool = False,
) -> str:
    """A small ``WanPipeline`` folder with Wan's real conditioning sizes.

    Real: the pipeline class and folder layout, UMT5's width 4096 (``text_dim`` 4096, so 512-row
    ``[1, 512, 4096]`` negatives fit), the tokenizer's 512 tokens with the end token, the transformer's
    architecture (patch (1, 2, 2), RoPE, qk RMS norm, cross-attention norm), ``AutoencoderKLWan`` with its
    16 latent channels, ``latents_mean`` / ``latents_std``, 8x spatial and 4x temporal compression, the
    scheduler config; ``experts=2``: Wan 2.2 A14B's ``transformer_2`` and ``boundary_ratio``. Small: one
    UMT5 layer with two 8-wide heads and a vocabulary of a few hundred pieces, ``layers`` transformer
    blocks 24 wide, a VAE 4 channels wide (16 px frames, 2x2 latents).

    ``real_widths=True``: the released Wan 2.1 1.3B sizes in every layer there is (transformer 1536 wide,
    12 heads of 128, feed-forward 8960; UMT5-XXL's layers: 64 heads of 64, feed-forward 10240; the
    released VAE's sizes), with ``layers`` transformer blocks and ``layers`` UMT5 layers and the small
    vocabulary: a random Wan of the real widths at reduced depth (about 1.4 GB at 2 layers). ``head_dim`` 128
    (small folders): one transformer head of the releases' size, which the single files' loader assumes, and two
    UMT5 layers, so a UMT5 file is told from a T5 one by the second layer's own relative attention bias.

    ``ti2v=True``: Wan 2.2 TI2V 5B's shape, as diffusers' converter writes its folder: a transformer of 48 latent
    channels, Wan 2.2's residual VAE (``is_residual``, 12 input channels: 2 x 2 patches; encoder 8 and decoder 12
    wide, three levels, one halving time: 8x spatial, 2x temporal here; the release's 48 ``latents_mean`` /
    ``latents_std``), ``expand_timesteps`` in ``model_index.json`` and the scheduler at the release's shift 5."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    torch.manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    te = tiny_t5(
        os.path.join(folder, "tokenizer"),
        512,
        4096,
        umt5=True,
        d_kv=64 if real_widths else 8,
        d_ff=10240 if real_widths else 32,
        layers=layers if real_widths else (2 if head_dim else 1),
        heads=64 if real_widths else 2,
    )
    te.save_pretrained(os.path.join(folder, "text_encoder"))

    def transformer():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=12 if real_widths else (1 if head_dim else 2),
            attention_head_dim=128 if real_widths else (head_dim or 12),
            in_channels=48 if ti2v else 16,
            out_channels=48 if ti2v else 16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=8960 if real_widths else 32,
            num_layers=layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024 if real_widths else 32,
        )

    transformer().save_pretrained(os.path.join(folder, "transformer"))
    if experts == 2:
        transformer().save_pretrained(os.path.join(folder, "transformer_2"))
    vae = (
        AutoencoderKLWan()  # its defaults are the released Wan 2.1 VAE's sizes
        if real_widths and not ti2v
        else AutoencoderKLWan(
            base_dim=8,
            decoder_base_dim=12,
            z_dim=48,
            dim_mult=[1, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True],
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_temporal=2,
            scale_factor_spatial=8,
            latents_mean=list(WAN22_LATENTS_MEAN),
            latents_std=list(WAN22_LATENTS_STD),
        )
        if ti2v
        else AutoencoderKLWan(
            base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
    )
    vae.save_pretrained(os.path.join(folder, "vae"))
    index = {
        "_class_name": "WanPipeline",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"] if experts == 2 else [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "boundary_ratio": boundary_ratio if experts == 2 else None,
        "expand_timesteps": ti2v,
    }
    sched = dict(WAN_SCHEDULER, flow_shift=WAN_TI2V_FLOW_SHIFT) if ti2v else dict(WAN_SCHEDULER)
    write_pipeline_files(folder, sched, index)
    return folder


# the scheduler configs the Flux.1 releases ship, as the single-file loader uses them
FLUX_SCHEDULERS = {"dev": FLUX_RELEASE_SCHEDULERS["flux-dev"], "schnell": FLUX_RELEASE_SCHEDULERS["flux-schnell"]}


def build_tiny_flux(folder: str, seed: int = 0, schnell: bool = False, t5_width: int = 4096) -> str:
    """A small Flux.1-architecture ``FluxPipeline`` folder with Flux's real conditioning sizes.

    Real: the pipeline class and folder layout, the two text encoders' widths (T5 v1.1 XXL's 4096,
    ``joint_attention_dim`` 4096; CLIP-L's 768 pooled output, ``pooled_projection_dim`` 768, over CLIP's
    real tokenizer), the token count (dev 512, schnell 256), 16 latent channels packed into 2x2 patches
    (``in_channels`` 64), the guidance embedding (dev; none for schnell), the VAE's scaling and shift
    factors, the scheduler configs. Small: one double-stream and one single-stream block of two 16-wide
    heads, one T5 layer, two CLIP layers, a two-level VAE (32 px images, 16 px latents, 8x8 patches)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    tokens = 256 if schnell else 512
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_width,
        pooled_projection_dim=768,
        guidance_embeds=not schnell,
        axes_dims_rope=(4, 6, 6),
    )
    vae = tiny_flux_ae()
    clip = tiny_clip(768, 4, intermediate=64, projection_dim=768)
    os.makedirs(folder, exist_ok=True)
    t5 = tiny_t5(os.path.join(folder, "tokenizer_2"), tokens, t5_width)
    transformer.save_pretrained(os.path.join(folder, "transformer"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    save_text_encoder_prefixed(clip, os.path.join(folder, "text_encoder"))
    write_clip_tokenizer(os.path.join(folder, "tokenizer"))
    t5.save_pretrained(os.path.join(folder, "text_encoder_2"))
    index = {
        "_class_name": "FluxPipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    write_pipeline_files(folder, FLUX_SCHEDULERS["schnell" if schnell else "dev"], index)
    return folder


def _bfl_blocks(lin, scale, h: int, depth: int, depth_single: int, modulation: bool) -> None:
    """The double- and single-stream blocks of the Black Forest Labs layout, through ``lin(name, out, in)`` and
    ``scale(name)`` (the query/key norms): Flux's with their modulation layers, Chroma's without (its
    ``distilled_guidance_layer`` makes them). MLP ratio 4."""
    m = 4 * h
    for i in range(depth):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}"
            if modulation:
                lin(f"{b}_mod.lin", 6 * h, h)
            lin(f"{b}_attn.qkv", 3 * h, h)
            scale(f"{b}_attn.norm.query_norm.scale")
            scale(f"{b}_attn.norm.key_norm.scale")
            lin(f"{b}_attn.proj", h, h)
            lin(f"{b}_mlp.0", m, h)
            lin(f"{b}_mlp.2", h, m)
    for i in range(depth_single):
        b = f"single_blocks.{i}"
        lin(f"{b}.linear1", 3 * h + m, h)
        lin(f"{b}.linear2", h, h + m)
        scale(f"{b}.norm.query_norm.scale")
        scale(f"{b}.norm.key_norm.scale")
        if modulation:
            lin(f"{b}.modulation.lin", 3 * h, h)


def bfl_flux_state_dict(
    hidden: int = 64,
    depth: int = 1,
    depth_single: int = 1,
    guidance: bool = True,
    context: int = 4096,
    pooled: int = 768,
    head_dim: int = 32,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A Flux.1 transformer's state dict in the Black Forest Labs layout ComfyUI loads from
    ``models/diffusion_models/`` (``img_in``, ``txt_in``, ``vector_in``, ``time_in``, ``guidance_in`` for
    dev, ``double_blocks.N``, ``single_blocks.N``, ``final_layer``), random, with Flux's shapes for a
    given width and depth (MLP ratio 4, 16 latent channels in 2x2 patches; the release: 3072 wide,
    19 + 38 blocks, heads of 128). Small random values keep a random model's outputs finite."""
    g = torch.Generator().manual_seed(seed)
    h = hidden
    sd: dict[str, torch.Tensor] = {}

    def lin(name, out, inp, bias=True):
        sd[name + ".weight"] = (torch.randn(out, inp, generator=g) * inp**-0.5).to(dtype)
        if bias:
            sd[name + ".bias"] = torch.zeros(out, dtype=dtype)

    def scale(name):
        sd[name] = torch.ones(head_dim, dtype=dtype)

    lin("img_in", h, 64)
    lin("txt_in", h, context)
    for emb, inp in (("time_in", 256), ("vector_in", pooled)) + ((("guidance_in", 256),) if guidance else ()):
        lin(f"{emb}.in_layer", h, inp)
        lin(f"{emb}.out_layer", h, h)
    _bfl_blocks(lin, scale, h, depth, depth_single, modulation=True)
    lin("final_layer.linear", 64, h)
    lin("final_layer.adaLN_modulation.1", 2 * h, h)
    return sd


def bfl_chroma_state_dict(
    hidden: int = 64,
    depth: int = 1,
    depth_single: int = 1,
    head_dim: int = 32,
    approximator: tuple[int, int, int] = (16, 32, 1),
    context: int = 4096,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A Chroma transformer's state dict in the layout ComfyUI loads from ``models/diffusion_models/``:
    Flux's blocks without their modulation layers, and the ``distilled_guidance_layer`` (``approximator``:
    input channels, width, layers; the release: 64, 5120, 5) that makes every block's modulations; random,
    with Chroma's shapes for a given width and depth (the release: 3072 wide, 19 + 38 blocks, heads of 128)."""
    g = torch.Generator().manual_seed(seed)
    h = hidden
    a_in, a_hidden, a_layers = approximator
    sd: dict[str, torch.Tensor] = {}

    def lin(name, out, inp):
        sd[name + ".weight"] = (torch.randn(out, inp, generator=g) * inp**-0.5).to(dtype)
        sd[name + ".bias"] = torch.zeros(out, dtype=dtype)

    lin("distilled_guidance_layer.in_proj", a_hidden, a_in)
    for i in range(a_layers):
        lin(f"distilled_guidance_layer.layers.{i}.in_layer", a_hidden, a_hidden)
        lin(f"distilled_guidance_layer.layers.{i}.out_layer", a_hidden, a_hidden)
        sd[f"distilled_guidance_layer.norms.{i}.scale"] = torch.ones(a_hidden, dtype=dtype)
    lin("distilled_guidance_layer.out_proj", h, a_hidden)
    lin("img_in", h, 64)
    lin("txt_in", h, context)

    def scale(name):
        sd[name] = torch.ones(head_dim, dtype=dtype)

    _bfl_blocks(lin, scale, h, depth, depth_single, modulation=False)
    lin("final_layer.linear", 64, h)
    return sd


CHROMA_SCHEDULER = CHROMA_RELEASE_SCHEDULER  # the one the single-file loader uses


def build_tiny_chroma(folder: str, seed: int = 0, t5_width: int = 4096) -> str:
    """A small Chroma-architecture diffusers folder (``ChromaPipeline``) with Chroma's real
    conditioning sizes.

    Real: the pipeline class and folder layout, T5's width 4096 (``joint_attention_dim``) and its
    512-token padding with the attention mask, T5 v1.1's architecture, the Flux VAE's 16 latent
    channels packed into 64 transformer channels (with its ``shift_factor``), the scheduler config
    (flow matching, dynamic shift). Small: one T5 layer, one double- and one single-stream block
    16 wide, a two-level VAE (32 px images, 16 px latents, 8 x 8 packed tokens)."""
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=t5_width,
        axes_dims_rope=(2, 2, 4),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    vae = tiny_flux_ae()
    os.makedirs(folder, exist_ok=True)
    te = tiny_t5(os.path.join(folder, "tokenizer"), 512, t5_width)
    transformer.save_pretrained(os.path.join(folder, "transformer"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    te.save_pretrained(os.path.join(folder, "text_encoder"))
    index = {
        "_class_name": "ChromaPipeline",
        "transformer": ["diffusers", "ChromaTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    write_pipeline_files(folder, CHROMA_SCHEDULER, index)
    return folder


QWEN_IMAGE_SCHEDULER = QWEN_SCHEDULER  # the one the single-file loader uses

_QWEN_WORDS = (
    "a the of and in on with at by for to is an red blue green yellow black white circle square photo portrait "
    "painting cat dog house tree sky city street man woman car flower blurry ugly low quality bad deformed distorted"
).split()


def _byte_unicode() -> dict[int, str]:
    """GPT-2's byte-to-unicode table, which byte-level BPE vocabularies (Qwen2's) are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
    bs += list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_qwen2_tokenizer(folder: str) -> None:
    """A transformers ``Qwen2Tokenizer`` folder: Qwen2's pre-tokenizer regex, byte-level BPE and special
    tokens (``<|endoftext|>`` pads, ``<|im_start|>``, ``<|im_end|>``), with a vocabulary of the 256 byte
    symbols plus every word of QwenImagePipeline's prompt template and a few prompt words as whole
    tokens, so the template splits exactly as Qwen2.5's 151,643-token vocabulary splits it (its system
    part is 34 tokens, the count the pipeline drops)."""
    import regex
    from tokenizers import models
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from .backends.qwen_image import TEMPLATE

    table = _byte_unicode()
    text = TEMPLATE.replace("<|im_start|>", "\n").replace("<|im_end|>", "\n").format(" ".join(_QWEN_WORDS))
    words = sorted(set(regex.findall(PRETOKENIZE_REGEX, text)) | {" " + w for w in _QWEN_WORDS})
    vocab: dict[str, int] = {}
    for c in table.values():
        vocab.setdefault(c, len(vocab))
    merges = []
    for w in words:
        w = "".join(table[b] for b in w.encode())
        for i in range(1, len(w)):
            if w[: i + 1] not in vocab:
                vocab[w[: i + 1]] = len(vocab)
                merges.append((w[:i], w[i]))
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    # whole words in the vocabulary are one token whatever the merges' order (Qwen2.5's words are)
    tok._tokenizer.model = models.BPE(vocab, merges, ignore_merges=True)
    tok.save_pretrained(folder)


def build_tiny_qwen_image(folder: str, seed: int = 0, text_layers: int = 1, head_dim: int = 16) -> str:
    """A small ``QwenImagePipeline`` folder with Qwen-Image's real conditioning sizes.

    Real: the pipeline class and folder layout; ``Qwen2_5_VLForConditionalGeneration`` with Qwen2.5-VL-7B's
    width 3584 (28 heads of 128, 4 key-value heads, its multimodal RoPE sections), so its rows are the
    family's; Qwen2's tokenizer layout with the template's real split; the transformer's 64 packed input
    channels, 16 output channels and 3584-wide text input; the VAE's 16 latent channels with Qwen-Image's
    ``latents_mean`` / ``latents_std``; Qwen-Image's scheduler config. Small: ``text_layers`` language-model
    layers with an MLP 16 wide, a one-block vision tower, a one-layer transformer 32 wide, a two-level VAE
    (scale 2: 16 px images, 8 px latents). About 120 MB on disk, almost all of it the language model's
    3584 x 3584 attention projections. ``head_dim`` 128 gives the transformer one head of the release's
    size and its rotary axes (16/56/56), which the single files' loader assumes."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    write_qwen2_tokenizer(os.path.join(folder, "tokenizer"))
    vocab = len(AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer")))
    te = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=vocab,
                hidden_size=3584,
                intermediate_size=16,
                num_hidden_layers=text_layers,
                num_attention_heads=28,
                num_key_value_heads=4,
                max_position_embeddings=2048,
                rms_norm_eps=1e-6,
                rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]),
                bos_token_id=vocab - 3,
                eos_token_id=vocab - 1,
            ),
            vision_config=dict(
                depth=1,
                hidden_size=16,
                intermediate_size=16,
                num_heads=2,
                out_hidden_size=3584,
                fullatt_block_indexes=[0],
            ),
            image_token_id=vocab + 10,
            video_token_id=vocab + 11,
            vision_start_token_id=vocab + 12,
            vision_end_token_id=vocab + 13,
        )
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=1,
        attention_head_dim=head_dim,
        num_attention_heads=2 if head_dim == 16 else 1,
        joint_attention_dim=3584,
        axes_dims_rope=(4, 6, 6) if head_dim == 16 else (head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16),
    )
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False])
    te.save_pretrained(os.path.join(folder, "text_encoder"))
    transformer.save_pretrained(os.path.join(folder, "transformer"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    index = {
        "_class_name": "QwenImagePipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    write_pipeline_files(folder, QWEN_IMAGE_SCHEDULER, index)
    return folder
