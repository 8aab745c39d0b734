"""Qwen-Image through diffusers: a 20B MMDiT reading Qwen2.5-VL-7B hidden states.

A diffusers ``QwenImagePipeline`` folder (``model_index.json`` naming it, with ``transformer/``
(``QwenImageTransformer2DModel``), ``vae/`` (``AutoencoderKLQwenImage``), ``text_encoder/``
(``Qwen2_5_VLForConditionalGeneration``), ``tokenizer/`` (``Qwen2Tokenizer``) and ``scheduler/``
(``FlowMatchEulerDiscreteScheduler``)) loads into :class:`QwenImageBackend`. Everything is done as
diffusers' ``QwenImagePipeline`` does it:

- **Text**: each prompt is wrapped in the pipeline's chat template and encoded by the language model;
  the last hidden state (3584 wide, after the final RMS norm) is kept for the prompt's real tokens, and
  the template's first 34 tokens (its system message and ``<|im_start|>user\\n``) are dropped. What is
  left is the prompt's own tokens and the template's 5-token tail (``<|im_end|>\\n<|im_start|>assistant\\n``):
  a variable number of rows, padded with zero rows and an attention mask in a batch.
- **Denoiser**: a flow-matching model (``x_t = (1 - t) x0 + t eps``, the transformer predicts the
  velocity ``eps - x0``); latents ``[B, 16, H/8, W/8]`` are packed into 2 x 2 patches for the
  transformer, with ``img_shapes`` for its RoPE and the text mask.
- **Guidance**: ``true_cfg_scale`` CFG on the velocity, then the pipeline's norm rescale: each
  patch's guided velocity is scaled to the norm of the conditional one (:meth:`QwenImageDenoiser.guide`,
  which :func:`reneg.sampling.cfg_denoise` and the objective's grad step call).
- **Schedule**: ``FlowMatchEulerDiscreteScheduler`` from the folder's config with the pipeline's
  sigmas ``linspace(1, 1/N, N)`` and its resolution-dependent shift ``mu`` (from the image's token count).
- **VAE**: ``AutoencoderKLQwenImage`` (a one-frame video VAE) with the config's ``latents_mean`` /
  ``latents_std``.
"""

from __future__ import annotations

import os

import torch

from ..cond import Cond
from ..embedding import implied_attention_mask
from ..families import get_family
from .diffusers_backend import DiffusersBackend, ModelLoadError, module_device
from .patches import pack, unpack
from .parts import T5_FOLDER_PARTS, load_parts, read_json, require_parts

PIPELINE = "QwenImagePipeline"
FAMILY = "qwen-image"
# QwenImagePipeline.prompt_template_encode and prompt_template_encode_start_idx (diffusers 0.35-0.42)
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
DROP = 34
TOKENIZER_MAX = 1024  # QwenImagePipeline.tokenizer_max_length: at most 1024 + 34 tokens are encoded
MAX_ROWS = 512  # the pipeline's default max_sequence_length: prompt rows past it are cut
SCHEDULER = {  # the scheduler config Qwen/Qwen-Image ships (scheduler/scheduler_config.json)
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def template_prefix_length(tokenizer) -> int:
    """How many tokens the template's part before the prompt (system message + ``<|im_start|>user\\n``)
    is for this tokenizer; Qwen2.5's tokenizer gives 34, the count the pipeline drops."""
    head = TEMPLATE.split("{}")[0]
    return len(tokenizer(head, add_special_tokens=False)["input_ids"])


class QwenImageDenoiser:
    """``D(x, t, cond) -> x0`` around a ``QwenImageTransformer2DModel``; ``t`` is the flow time."""

    flow = True
    prediction_type = "flow"

    def __init__(self, transformer):
        self.unet = transformer

    @property
    def transformer(self):
        return self.unet

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        b, _, h, w = x.shape
        dt = self.unet.dtype
        mask = cond.mask
        if mask is not None and bool(mask.bool().all()):
            mask = None  # what the pipeline passes when no row is padding (encode_prompt)
        out = self.unet(
            hidden_states=pack(x).to(dt),
            timestep=sigma.to(dt),
            encoder_hidden_states=cond.crossattn.to(dt),
            encoder_hidden_states_mask=None if mask is None else mask.to(dt),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack(out, h, w).to(x.dtype)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        t = sigma.to(x.dtype).view(-1, 1, 1, 1)
        return x - t * self.velocity(x, sigma, cond)

    def guide(self, x: torch.Tensor, sigma: torch.Tensor, x0_u: torch.Tensor, x0_c: torch.Tensor, scale: float):
        """QwenImagePipeline's true CFG: ``v = v_u + g (v_c - v_u)``, then every packed token's ``v`` is
        rescaled to the norm of the conditional ``v_c`` (``comb_pred * (cond_norm / noise_norm)``), and
        ``x0 = x - t v``. Not a linear combination of the two predictions, so the sampler asks the
        denoiser for it (:func:`reneg.sampling.own_guidance`)."""
        t = sigma.to(x.dtype).view(-1, 1, 1, 1)
        v_u, v_c = pack((x - x0_u) / t), pack((x - x0_c) / t)
        v = v_u + scale * (v_c - v_u)
        v = v * (torch.norm(v_c, dim=-1, keepdim=True) / torch.norm(v, dim=-1, keepdim=True))
        return x - t * unpack(v, x.shape[-2], x.shape[-1])


class QwenImageBackend(DiffusersBackend):
    """The transformer (held in ``unet`` so the shared code applies), the Qwen-Image VAE and
    Qwen2.5-VL; see the module docstring for what each part does."""

    flow = True

    def __post_init__(self):
        self._denoiser = QwenImageDenoiser(self.unet)
        self._cache: dict[str, torch.Tensor] = {}
        self._null = None
        self.max_tokens = get_family(self.family).tokens
        self.image_size = (1024, 1024)  # the pipeline's default size; latent_shape() sets the one in use

    @property
    def transformer(self):
        return self.unet

    @property
    def prediction_type(self) -> str:
        return "flow"

    def describe(self) -> str:
        name = os.path.basename(os.path.normpath(self.source)) or self.source
        return f"{name}: {self.family} ({self.model_info.get('kind', 'diffusers folder')}), flow matching, its own VAE"

    # --- schedule and latents --------------------------------------------------------------

    @property
    def vae_scale(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """``[B, z_dim, H/8, W/8]``; H and W must be multiples of 16 (8 for the VAE, 2 for the patches).
        Also sets the image size whose token count fixes the schedule's shift."""
        f = self.vae_scale * 2
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for Qwen-Image, got {height}x{width}")
        self.image_size = (int(height), int(width))
        return (batch, int(self.vae.config.z_dim), height // self.vae_scale, width // self.vae_scale)

    def shift_mu(self) -> float | None:
        """QwenImagePipeline's ``calculate_shift`` for the image size in use (None: no dynamic shifting)."""
        c = self.scheduler_config
        if not c.get("use_dynamic_shifting", False):
            return None
        h, w = self.image_size
        seq = (h // self.vae_scale // 2) * (w // self.vae_scale // 2)
        b0, b1 = int(c.get("base_image_seq_len", 256)), int(c.get("max_image_seq_len", 4096))
        s0, s1 = float(c.get("base_shift", 0.5)), float(c.get("max_shift", 1.15))
        m = (s1 - s0) / (b1 - b0)
        return seq * m + (s0 - m * b0)

    def schedule(self, steps: int) -> torch.Tensor:
        """Flow times ``[steps + 1]`` ending at 0: the folder's ``FlowMatchEulerDiscreteScheduler`` with
        the pipeline's sigmas ``linspace(1, 1/steps, steps)`` and shift ``mu`` (see :meth:`shift_mu`)."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=self.shift_mu())
        return sched.sigmas.double()

    def resolution_note(self, resolution: int) -> str | None:
        return None

    # --- text ------------------------------------------------------------------------------

    @property
    def pooled_dim(self) -> None:
        return None

    @torch.no_grad()
    def _encode_rows(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each prompt's rows ``[n_i, 3584]`` as QwenImagePipeline._get_qwen_prompt_embeds makes them
        (the real tokens' last hidden state, the template's first 34 dropped), cut to 512 rows as the
        pipeline's default ``max_sequence_length`` does."""
        tok = self.tokenizer(
            [TEMPLATE.format(p) for p in prompts],
            max_length=TOKENIZER_MAX + DROP,
            padding=True,
            truncation=True,
            return_tensors="pt",
        )
        dev = module_device(self.text_encoder)  # the CPU after offload_text_encoder()
        ids, mask = tok.input_ids.to(dev), tok.attention_mask.to(dev)
        lm = getattr(self.text_encoder, "model", self.text_encoder)  # the hidden states without the logits
        hidden = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        return [hidden[i][mask[i].bool()][DROP:][:MAX_ROWS].float().to(self.device) for i in range(len(prompts))]

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Rows padded with zero rows to the longest prompt, and their mask (cached per prompt: one
        prompt per encoder call, so an encoding never depends on the prompts beside it)."""
        for p in dict.fromkeys(prompts):
            if p not in self._cache:
                self._cache[p] = self._keep(self._encode_rows([p])[0])
        self._trim_cache(prompts)
        rows = [self._use(self._cache[p]) for p in prompts]
        n = max(r.shape[0] for r in rows)
        x = torch.stack([torch.cat([r, r.new_zeros(n - r.shape[0], r.shape[1])]) for r in rows])
        mask = torch.stack(
            [
                torch.cat([torch.ones(r.shape[0], dtype=torch.long), torch.zeros(n - r.shape[0], dtype=torch.long)])
                for r in rows
            ]
        )
        return Cond(x, mask=mask.to(self.device))

    def _empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._null is None:
            rows = self._encode_rows([""])[0]
            k = rows.shape[0]
            pad = max(self.max_tokens - k, 0)
            neg = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])[None]
            mask = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(pad, dtype=torch.long)])[None]
            self._null = (neg, mask.to(self.device))
        return self._null

    def null_embedding(self) -> tuple[torch.Tensor, None]:
        """``E("")``: the empty prompt's rows (the template's tail: 5 for Qwen2.5's tokenizer), then zero
        rows up to the family's row count, which the mask (:meth:`negative_mask`) leaves out."""
        return self._empty()[0].clone(), None

    def null_mask(self) -> torch.Tensor:
        return self._empty()[1].clone()

    def negative_mask(self, neg: torch.Tensor) -> torch.Tensor:
        """A negative's mask when none is given: trailing all-zero rows are padding
        (:func:`reneg.embedding.implied_attention_mask`)."""
        return implied_attention_mask(neg.detach()).to(self.device)

    def negative_cond(
        self, neg: torch.Tensor, pooled: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> Cond:
        """A negative keeps all its rows and carries its mask (by default :meth:`negative_mask`); a batch
        pads it with masked zero rows to the prompts' length, or pads the prompts to its length."""
        if pooled is not None:
            raise ValueError(f"{self.family} reads no pooled vector; a pooled vector was given with the negative")
        if neg.dim() != 3 or neg.shape[0] != 1:
            raise ValueError(f"a negative must be [1, tokens, hidden], got {list(neg.shape)}")
        if neg.shape[1] > TOKENIZER_MAX:
            raise ValueError(f"Qwen-Image reads at most {TOKENIZER_MAX} text rows; the negative has {neg.shape[1]}")
        m = self.negative_mask(neg) if mask is None else mask.reshape(1, -1).long().to(self.device)
        if m.shape[1] != neg.shape[1]:
            raise ValueError(f"the attention mask covers {m.shape[1]} rows, the negative has {neg.shape[1]}")
        return Cond(neg.to(self.device), mask=m)

    # --- image -----------------------------------------------------------------------------

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """``latents * std + mean`` per channel (the config's ``latents_std`` / ``latents_mean``), decoded
        as a one-frame video; ``[B, 3, H, W]`` in [-1, 1]."""
        vae = self.vae
        c = vae.config
        mean = torch.tensor(c.latents_mean, dtype=x0.dtype, device=x0.device).view(1, -1, 1, 1)
        std = torch.tensor(c.latents_std, dtype=x0.dtype, device=x0.device).view(1, -1, 1, 1)
        z = (x0 * std + mean).unsqueeze(2)
        img = vae.decode(z.to(vae.dtype), return_dict=False)[0][:, :, 0]
        return img.to(torch.promote_types(img.dtype, torch.float32)).clamp(-1, 1)

    def set_performance(self, *, sdpa=None, checkpointing=None, channels_last=None, compile=False):
        """Gradient checkpointing of the transformer (``checkpointing``) and ``torch.compile``; the
        transformer's attention is diffusers' own SDPA processor, and ``channels_last`` does not apply."""
        m = self.unet
        if checkpointing:
            m.enable_gradient_checkpointing()
        elif checkpointing is not None:
            m.disable_gradient_checkpointing()
        if compile:
            m.compile()
        return self

    def to(self, device) -> "QwenImageBackend":
        super().to(device)
        return self


def is_qwen_image_folder(path: str) -> bool:
    p = os.path.join(path, "model_index.json")
    return os.path.isfile(p) and read_json(p).get("_class_name") == PIPELINE


def load_folder(path: str, device="cpu", dtype: torch.dtype = torch.float32) -> QwenImageBackend:
    """Load a diffusers QwenImagePipeline folder from local files only."""
    index = read_json(os.path.join(path, "model_index.json"))
    if index.get("_class_name") != PIPELINE:
        raise ModelLoadError(f"{path}: model_index.json names {index.get('_class_name')!r}, not {PIPELINE}")
    require_parts(path, PIPELINE, T5_FOLDER_PARTS)
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    parts = {"transformer": QwenImageTransformer2DModel, "vae": AutoencoderKLQwenImage}
    m = load_parts(path, dtype, {**parts, "text_encoder": Qwen2_5_VLForConditionalGeneration})
    transformer, vae, text_encoder = m["transformer"], m["vae"], m["text_encoder"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"), local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(f"{path}: could not load the model: {str(e)[:400]}") from None
    sched = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    info = {"source": path, "kind": "diffusers folder", "family": FAMILY, "vae": "inside"}
    return build_backend(transformer, vae, text_encoder, tokenizer, sched, path, device, dtype, info)


def build_backend(transformer, vae, text_encoder, tokenizer, sched: dict, path: str, device, dtype, info: dict):
    """A :class:`QwenImageBackend` from its parts (a folder's or the single files'), after checking that they
    belong together: the text encoder's width is the transformer's text input and Qwen2.5-VL-7B's, the
    tokenizer splits the prompt template as the pipeline counts on, and the transformer reads 2 x 2 patches
    of the VAE's latent channels."""
    spec = get_family(FAMILY)
    width = int(text_encoder.config.get_text_config().hidden_size)
    joint = int(transformer.config.joint_attention_dim)
    if width != joint:
        raise ModelLoadError(
            f"{path}: the text encoder's width {width} does not match the transformer's joint_attention_dim {joint}"
        )
    if width != spec.hidden:
        raise ModelLoadError(
            f"{path}: Qwen-Image reads Qwen2.5-VL-7B rows of width {spec.hidden}; this text encoder is {width} wide"
        )
    head = template_prefix_length(tokenizer)
    if head != DROP:
        raise ModelLoadError(
            f"{path}: the tokenizer makes {head} tokens of the prompt template's system part; QwenImagePipeline "
            f"drops {DROP} (Qwen2.5's tokenizer), so this tokenizer does not belong to the model"
        )
    latent = int(vae.config.z_dim)
    if int(transformer.config.in_channels) != 4 * latent:
        raise ModelLoadError(
            f"{path}: the transformer reads {transformer.config.in_channels} channels; 2 x 2 patches of the "
            f"VAE's {latent} latent channels are {4 * latent}"
        )
    for m in (transformer, vae, text_encoder):
        m.requires_grad_(False).eval()
    backend = QwenImageBackend(
        transformer, vae, text_encoder, tokenizer, dict(sched), FAMILY, path, torch.device(device), dtype
    )
    backend.model_info = info
    return backend.to(device)
