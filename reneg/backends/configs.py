"""The configurations of the architectures a single-file checkpoint can hold, as data.

A single ``.safetensors`` checkpoint carries weights only. These are the UNet,
VAE, text-encoder and scheduler configurations of the original releases
(Stable Diffusion 1.5, 2.1 at 512 and 768 px, SDXL base 1.0), written out here so
that nothing is ever downloaded: the keys and values are those of the
diffusers / transformers ``config.json`` files of those releases. The
tokenizers are built from the BPE vocabulary open_clip ships (see
:func:`reneg.backends.clip_tokenizer.write_clip_tokenizer`); only their pad token differs.
"""

from __future__ import annotations

import copy

_SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

_CLIP_L = {  # OpenAI CLIP ViT-L/14 text tower (SD1.x, SDXL's first encoder)
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

_SCHEDULER = {  # the DDPM training schedule all three share
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

# keyed by family name (reneg/families.py): the families a single-file checkpoint can hold
ARCHITECTURES: dict[str, dict] = {
    "sd1": {
        "unet": {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": dict(_SD_VAE),
        "text_encoder": ("CLIPTextModel", dict(_CLIP_L)),
        "tokenizer_pad": "<|endoftext|>",
        "scheduler": dict(_SCHEDULER, _class_name="DDIMScheduler"),
    },
    "sd2": {
        "unet": {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
            "norm_num_groups": 32,
        },
        "vae": dict(_SD_VAE),
        # OpenCLIP ViT-H/14 cut to 23 of its 24 layers: SD2 reads the penultimate layer
        "text_encoder": (
            "CLIPTextModel",
            {
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 23,
                "num_attention_heads": 16,
                "max_position_embeddings": 77,
                "vocab_size": 49408,
                "hidden_act": "gelu",
                "projection_dim": 512,
                "layer_norm_eps": 1e-5,
                "bos_token_id": 0,
                "eos_token_id": 2,
                "pad_token_id": 1,
            },
        ),
        "tokenizer_pad": "!",
        "scheduler": dict(_SCHEDULER, _class_name="DDIMScheduler"),
    },
    "sdxl": {
        "unet": {
            "sample_size": 128,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10],
            "cross_attention_dim": 2048,
            "attention_head_dim": [5, 10, 20],
            "use_linear_projection": True,
            "norm_num_groups": 32,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "vae": dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        "text_encoder": ("CLIPTextModel", dict(_CLIP_L)),
        "tokenizer_pad": "<|endoftext|>",
        # OpenCLIP ViT-bigG/14: SDXL reads its penultimate layer and its projected pooled vector
        "text_encoder_2": (
            "CLIPTextModelWithProjection",
            {
                "hidden_size": 1280,
                "intermediate_size": 5120,
                "num_hidden_layers": 32,
                "num_attention_heads": 20,
                "max_position_embeddings": 77,
                "vocab_size": 49408,
                "hidden_act": "gelu",
                "projection_dim": 1280,
                "layer_norm_eps": 1e-5,
                "bos_token_id": 0,
                "eos_token_id": 2,
                "pad_token_id": 1,
            },
        ),
        "tokenizer_2_pad": "!",
        "scheduler": dict(_SCHEDULER, _class_name="EulerDiscreteScheduler"),
    },
}


def architecture(family: str) -> dict:
    """A deep copy of one architecture's configurations (callers may change it)."""
    try:
        return copy.deepcopy(ARCHITECTURES[family])
    except KeyError:
        raise ValueError(f"no built-in configuration for {family!r} (have {', '.join(ARCHITECTURES)})") from None
