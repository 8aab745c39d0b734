"""Tiny models built from small fixed configs, saved in the real file layouts.

Used by the test-suite and by benchmarks: a diffusers Stable Diffusion folder
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel + the real CLIP tokenizer,
DDIM scheduler) and an HPS-format open_clip checkpoint, so that they load through
exactly the code paths users' files take. Random weights: they prove the
machinery, not the method (the demo world in :mod:`reneg.demo_world` does that).

Of the three look-alikes: this module builds random-weight models for tests and benchmarks;
:mod:`reneg.demo_world` holds the shipped *trained* demo models; :mod:`reneg.demo` sets up a
``--demo`` run on one of the two.
"""

from __future__ import annotations

import gzip
import json
import os

import torch

SD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

SD_MODEL_INDEX = {  # a StableDiffusionPipeline folder's model_index.json
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}


def _tiny_unet_blocks(dim: str = "2D") -> dict:
    """The small UNets' shape (two levels, one with cross-attention): SD's 2-D blocks, ZeroScope's 3-D ones."""
    return dict(
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=8,
        down_block_types=(f"CrossAttnDownBlock{dim}", f"DownBlock{dim}"),
        up_block_types=(f"UpBlock{dim}", f"CrossAttnUpBlock{dim}"),
        attention_head_dim=8,
    )


def _tiny_vae(sample_size: int, **kw):
    """A two-level AutoencoderKL: images of ``sample_size`` px, latents of half that."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size,
        **kw,
    )


def _tiny_clip(hidden: int, heads: int, intermediate: int = 64, cls=None, **kw):
    """A two-layer CLIP text encoder of width ``hidden`` over CLIP's real vocabulary and 77 positions."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=heads,
        vocab_size=49408,
        max_position_embeddings=77,
        **kw,
    )
    return (cls or CLIPTextModel)(cfg)


def write_pipeline_files(folder: str, scheduler: dict, index: dict) -> None:
    """A diffusers folder's ``scheduler/scheduler_config.json`` and ``model_index.json``."""
    from .fileio import atomic_write_json

    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    atomic_write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler)
    atomic_write_json(os.path.join(folder, "model_index.json"), dict(index, _diffusers_version="0.30.0"))


def write_clip_tokenizer(folder: str, pad_token: str = "<|endoftext|>") -> None:
    """A transformers CLIPTokenizer folder built offline from open_clip's BPE file
    (same ids as open_clip's tokenizer): real CLIP ids, padded with ``<|endoftext|>`` as SD1.x does
    (SDXL's second tokenizer pads with ``!``)."""
    import open_clip

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    from open_clip.tokenizer import bytes_to_unicode

    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
        "errors": "replace",
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f, indent=1)


def save_text_encoder_prefixed(text_encoder, folder: str) -> None:
    """Save a CLIPTextModel with the ``text_model.`` key prefix real SD folders use
    (transformers 5 drops it; ComfyUI then loads garbage: NaN images)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    text_encoder.config.save_pretrained(folder)
    sd = {}
    for k, v in text_encoder.state_dict().items():
        key = k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k
        sd[key] = v.detach().contiguous().clone()
    save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def build_tiny_pipeline(
    folder: str, seed: int = 0, hidden: int = 64, prediction_type: str = "epsilon", sample_size: int = 8
) -> str:
    """A tiny SD-architecture diffusers folder (family ``tiny``, hidden 64): 16 px images, 8 px latents."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)  # the parts are made in this order: their random weights depend on it
    unet = UNet2DConditionModel(sample_size=sample_size, cross_attention_dim=hidden, **_tiny_unet_blocks())
    vae = _tiny_vae(sample_size * 2)
    te = _tiny_clip(hidden, 4, intermediate=2 * hidden, projection_dim=hidden)
    os.makedirs(folder, exist_ok=True)
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    save_text_encoder_prefixed(te, os.path.join(folder, "text_encoder"))
    write_clip_tokenizer(os.path.join(folder, "tokenizer"))
    write_pipeline_files(folder, dict(SD_SCHEDULER, prediction_type=prediction_type), SD_MODEL_INDEX)
    return folder


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
        **_tiny_unet_blocks(),
    )
    vae = _tiny_vae(sample_size * 2, scaling_factor=0.13025, force_upcast=True)
    te = _tiny_clip(768, 12, projection_dim=768)
    te2 = _tiny_clip(1280, 20, cls=CLIPTextModelWithProjection, projection_dim=1280, hidden_act="gelu", pad_token_id=0)
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


TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def build_tiny_hps(folder: str, seed: int = 0, config: dict | None = None) -> str:
    """An HPS-format checkpoint (``{"state_dict": ...}``) of a small open_clip model,
    with its ``open_clip_config.json`` beside it. Returns the checkpoint path."""
    import open_clip

    cfg = config or TINY_CLIP_CONFIG
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg}, f, indent=1)
    path = os.path.join(folder, "hps_tiny.pt")
    torch.save({"state_dict": model.state_dict()}, path)
    return path


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
    from transformers import T5Config, T5EncoderModel

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
    vae = _tiny_vae(16, scaling_factor=0.13025 if sigma else 0.18215)
    os.makedirs(folder, exist_ok=True)
    write_t5_tokenizer(os.path.join(folder, "tokenizer"), tokens)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer")))
    te = T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=t5_width,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
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
    unet = UNet3DConditionModel(sample_size=sample_size, cross_attention_dim=hidden, **_tiny_unet_blocks("3D"))
    vae = _tiny_vae(sample_size * 2)
    te = _tiny_clip(hidden, 16, projection_dim=hidden, hidden_act="gelu", pad_token_id=0)
    os.makedirs(folder, exist_ok=True)
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    save_text_encoder_prefixed(te, os.path.join(folder, "text_encoder"))
    write_clip_tokenizer(os.path.join(folder, "tokenizer"), pad_token="!")
    index = {k: v for k, v in SD_MODEL_INDEX.items() if "safety" not in k and k != "feature_extractor"}
    index.update(_class_name="TextToVideoSDPipeline", unet=["diffusers", "UNet3DConditionModel"])
    write_pipeline_files(folder, SD_SCHEDULER, index)
    return folder
