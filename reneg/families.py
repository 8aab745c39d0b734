"""Model families a negative embedding can belong to (the table in docs/embeddings.md).

A family fixes the space the embedding lives in: the hidden size of the text
encoder output the UNet reads, the number of token rows, and whether a pooled
vector travels with it. Adding SD3 later is one more entry here plus a backend.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    hidden: int
    tokens: int
    pooled: int | None  # size of the pooled vector the family needs, or None
    text_encoder: str
    description: str
    # hidden sizes of the text encoders whose outputs the UNet reads, in order: how a loaded
    # model's family is recognised (empty: the family is not recognised that way)
    encoders: tuple[int, ...] = ()
    # front-ends that handle this family: "a1111" = the AUTOMATIC1111 / Forge / reForge extension
    # (its on_cfg_denoiser hook replaces a CLIP-style [B, 77 k, D] negative; the host's own flag
    # for a model of this family is ``is_<name>``)
    hosts: tuple[str, ...] = ()
    # T5 families: rows past the text's own tokens are padding the model ignores through an
    # attention mask, which travels with the rows (``Cond.mask``, the file's ``attention_mask``)
    masked: bool = False
    # masked families: padding rows past the text the model still reads (Chroma reads one: its
    # pipeline and its trainer unmask the first padding token), so a negative's mask covers them too
    reads_padding: int = 0
    flow: bool = False  # a flow-matching model (x_t = (1 - t) x0 + t eps): the sampler starts from plain noise
    # MMDiT families: the text rows join the image tokens in attention, so repeating rows to batch
    # conds of different lengths changes the output (CLIP/T5 cross-attention is unchanged by it)
    joint: bool = False
    space: str = ""  # families sharing a text-encoder output space (and so their negatives)
    comfy_image_model: str = ""  # ComfyUI's unet_config["image_model"] for models it tells apart that way
    # the diffusers pipeline a folder's model_index.json names (``_class_name``), for the T5 families
    # whose folders are recognised by it (reneg/backends/pixart.py loads them)
    pipeline: str = ""
    motion_adapter: bool = False  # AnimateDiff motion adapters fit this family's UNet (reneg eval --video)
    # the A1111 extension warns when the host's CLIP skip differs from the one the embedding was learned at
    # (the host's setting moves this family's negative to another layer's space)
    clip_skip_warning: bool = False
    note: str = ""  # more for docs/embeddings.md's table (Markdown; links relative to docs/)
    # single-file checkpoints in the original (LDM) layout, read by reneg/backends/single_file/: the key
    # prefix and short name of each text encoder, in the order of ``encoders`` (empty: not read from one file)
    checkpoint_encoders: tuple[tuple[str, str], ...] = ()
    native_resolution: int = 0  # px of the base release: a checkpoint's native image size
    v_native_resolution: int = 0  # px of its v-prediction release where that differs (SD2.x's 768-v)
    v_from_norm_std: bool = False  # no marker tells v-prediction apart: ComfyUI's norm-bias test does
    # Normalized Attention Guidance's (scale, tau, alpha) for this family (reneg/nag.py, docs/nag.md): the
    # authors' values where they published some for the family, else their general defaults (5, 2.5, 0.25:
    # ComfyUI-NAG's node inputs and their diffusers Flux pipeline)
    nag: tuple[float, float, float] = (5.0, 2.5, 0.25)

    @property
    def text_space(self) -> str:
        return self.space or self.name


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "sd1",
            768,
            77,
            None,
            "CLIP ViT-L/14 (OpenAI), last layer, final layer norm",
            "Stable Diffusion 1.x",
            (768,),
            ("a1111",),
            motion_adapter=True,
            clip_skip_warning=True,
            note="padded with the end token",
            checkpoint_encoders=(("cond_stage_model.transformer.", "CLIP-L"),),
            native_resolution=512,
            nag=(5.0, 2.5, 0.38),  # the authors' SD1.5 workflow (ComfyUI-NAG, NAG-SD15: CFG 7 with NAG)
        ),
        Family(
            "sd2",
            1024,
            77,
            None,
            "OpenCLIP ViT-H/14, penultimate layer, final layer norm",
            "Stable Diffusion 2.x",
            (1024,),
            ("a1111",),
            checkpoint_encoders=(("cond_stage_model.model.", "OpenCLIP-H"),),
            native_resolution=512,
            v_native_resolution=768,
            v_from_norm_std=True,
        ),
        Family(
            "sdxl",
            2048,
            77,
            1280,
            "CLIP ViT-L/14 + OpenCLIP ViT-bigG/14, penultimate layers",
            "Stable Diffusion XL",
            (768, 1280),
            ("a1111",),
            note="the two side by side; pooled: bigG's projection of the empty prompt",
            checkpoint_encoders=(
                ("conditioner.embedders.0.transformer.", "CLIP-L"),
                ("conditioner.embedders.1.model.", "OpenCLIP bigG"),
            ),
            native_resolution=1024,
            nag=(3.0, 2.5, 0.5),  # the authors' SDXL few-step workflow (ComfyUI-NAG, NAG-DMD2: CFG 1)
        ),
        Family(
            "pixart",
            4096,
            120,
            None,
            "T5 v1.1 XXL encoder, last layer (final RMS norm), attention mask",
            "PixArt-alpha",
            masked=True,
            space="t5xxl",
            comfy_image_model="pixart_alpha",
            pipeline="PixArtAlphaPipeline",
            note="see [PixArt](pixart.md)",
        ),
        Family(
            "pixart-sigma",
            4096,
            300,
            None,
            "T5 v1.1 XXL encoder, last layer (final RMS norm), attention mask",
            "PixArt-sigma",
            masked=True,
            space="t5xxl",
            comfy_image_model="pixart_sigma",
            pipeline="PixArtSigmaPipeline",
            note="see [PixArt](pixart.md)",
        ),
        Family(
            "wan",
            4096,
            512,
            None,
            "UMT5-XXL encoder, last layer (final RMS norm); rows past the prompt's tokens and end token zeroed",
            "Wan 2.1 / 2.2 text-to-video",
            flow=True,
            space="umt5xxl",
            comfy_image_model="wan2.1",
            pipeline="WanPipeline",
            note="no attention mask: the transformer reads all 512 rows, zeros included; see [Wan](wan.md)",
        ),
        Family(
            "wan-experts",
            4096,
            1024,
            None,
            "UMT5-XXL encoder, as wan; the high-noise expert's 512 rows, then the low-noise expert's 512",
            "Wan 2.2 A14B, one negative per expert",
            flow=True,
            space="umt5xxl",
            note="two `wan` negatives in one file (`--wan-experts per-expert`); see [Wan](wan.md)",
        ),
        Family(
            "flux-dev",
            4096,
            512,
            768,
            "T5 v1.1 XXL encoder, last layer (final RMS norm), no attention mask; pooled: CLIP ViT-L/14's pooled output",
            "Flux.1 dev",
            joint=True,
            flow=True,
            space="flux",
            comfy_image_model="flux",
            pipeline="FluxPipeline",
            note="rows padded with T5's pad token and all read; see [Flux](flux.md)",
        ),
        Family(
            "flux-schnell",
            4096,
            256,
            768,
            "T5 v1.1 XXL encoder, last layer (final RMS norm), no attention mask; pooled: CLIP ViT-L/14's pooled output",
            "Flux.1 schnell",
            joint=True,
            flow=True,
            space="flux",
            comfy_image_model="flux",
            pipeline="FluxPipeline",
            note="rows padded with T5's pad token and all read; see [Flux](flux.md)",
        ),
        Family(
            "chroma",
            4096,
            512,
            None,
            "T5 v1.1 XXL encoder, last layer (final RMS norm), attention mask",
            "Chroma",
            masked=True,
            reads_padding=1,
            joint=True,
            flow=True,
            space="t5xxl",
            comfy_image_model="chroma",
            pipeline="ChromaPipeline",
            note="the mask covers the text and one padding row; see [Chroma](chroma.md)",
            native_resolution=1024,
        ),
        Family(
            "qwen-image",
            3584,
            128,
            None,
            "Qwen2.5-VL-7B, last layer (final RMS norm), chat template's system part dropped, attention mask",
            "Qwen-Image",
            masked=True,
            joint=True,
            flow=True,
            comfy_image_model="qwen_image",
            pipeline="QwenImagePipeline",
            note="rows: the prompt's own tokens and the template's 5-token tail, padding masked; "
            "see [Qwen-Image](qwen-image.md)",
        ),
        Family(
            "tiny",
            64,
            77,
            None,
            "small CLIP text model (demo world and tests)",
            "ReNeg's built-in demo world",
            (64,),
            motion_adapter=True,  # the tests' tiny SD UNet takes a tiny motion adapter
            note="see [the demo world](demo-world.md)",
        ),
    )
}

BY_HIDDEN: dict[int, Family] = {}
for _f in FAMILIES.values():  # the first family of a width is the one a bare file of that width is
    BY_HIDDEN.setdefault(_f.hidden, _f)


def family_for_hidden(hidden: int) -> Family | None:
    return BY_HIDDEN.get(int(hidden))


def family_for_encoders(widths: tuple[int, ...]) -> Family | None:
    """The family whose text encoders have these hidden sizes, in order."""
    widths = tuple(int(w) for w in widths)
    return next((f for f in FAMILIES.values() if f.encoders and f.encoders == widths), None)


def family_for_shape(hidden: int, tokens: int, pooled: bool | None = None, masked: bool | None = None) -> Family | None:
    """The family of a ``[1, tokens, hidden]`` tensor. Several share T5's width 4096 and differ in their
    token count (PixArt-alpha 120, PixArt-sigma 300, Flux schnell 256) or, at 512 rows, in what comes with
    the rows: a pooled vector (Flux dev), an attention mask (Chroma), neither (Wan). ``pooled`` / ``masked``
    (None: unknown) pick among those; without them the first family in the table with the shape wins."""
    fam = family_for_hidden(hidden)
    same = [f for f in FAMILIES.values() if f.hidden == int(hidden) and f.tokens == int(tokens)]
    if pooled is not None:
        same = [f for f in same if (f.pooled is not None) == pooled] or same
    if masked is not None:
        same = [f for f in same if f.masked == masked] or same
    if fam is not None and (fam.tokens != int(tokens) or (same and fam not in same)):
        fam = same[0] if same else fam
    return fam


def family_for_text(hidden: int, pooled: int | None = None) -> Family | None:
    """The family of a host's text conditioning from its width and, where families share a width, the
    size of the pooled vector beside it: T5-XXL's 4096-wide rows alone are PixArt's, with CLIP-L's
    768-wide pooled vector Flux's (dev, the first; schnell shares its space)."""
    if pooled:
        both = next((f for f in FAMILIES.values() if f.hidden == int(hidden) and f.pooled == int(pooled)), None)
        if both is not None:
            return both
    return family_for_hidden(hidden)


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; expected one of {', '.join(sorted(FAMILIES))}") from None


def known_hidden_sizes() -> str:
    return ", ".join(f"{h} ({'/'.join(f.name for f in FAMILIES.values() if f.hidden == h)})" for h in BY_HIDDEN)


# widths of text-encoder outputs no family here uses, and what they usually mean
OTHER_HIDDEN: dict[int, str] = {1280: "an SDXL refiner?"}


def describe_hidden(hidden: int) -> str:
    """``"768 (Stable Diffusion 1.x)"``: a hidden size and the family it belongs to, for messages."""
    fam = family_for_hidden(hidden)
    if fam is not None:
        return f"{hidden} ({fam.description})"
    if int(hidden) in OTHER_HIDDEN:
        return f"{hidden} ({OTHER_HIDDEN[int(hidden)]})"
    return str(hidden)


def families_for_host(host: str) -> tuple[str, ...]:
    """Names of the families a front-end handles, in table order."""
    return tuple(f.name for f in FAMILIES.values() if host in f.hosts)


def family_for_model(hidden: int, image_model: str | None = None) -> Family | None:
    """The family of a model in a host UI, from the width of the text conditioning it reads and,
    for the models ComfyUI tells apart by ``unet_config["image_model"]`` (PixArt), that name.
    A T5 width without a known model is None: T5 also feeds models no ReNeg family covers."""
    if image_model:
        for f in FAMILIES.values():
            if f.comfy_image_model and f.comfy_image_model == image_model:
                return f if f.hidden == int(hidden) else None
    fam = family_for_hidden(hidden)
    return None if fam is None or fam.masked else fam


def markdown_table() -> str:
    """The families as a Markdown table (docs/embeddings.md is made from it)."""
    rows = [
        "| family | model | hidden size D | rows | pooled | text encoder (convention) |",
        "|---|---|---|---|---|---|",
    ]
    for f in FAMILIES.values():
        notes = [f.note] if f.note else []
        first = next(g for g in FAMILIES.values() if g.text_space == f.text_space)
        if first is not f:
            notes.append(f"the same space as `{first.name}`")
        encoder = "; ".join([f.text_encoder, *notes])
        pooled = f.pooled if f.pooled else "\u2013"
        rows.append(f"| `{f.name}` | {f.description} | {f.hidden} | {f.tokens} | {pooled} | {encoder} |")
    return "\n".join(rows)
