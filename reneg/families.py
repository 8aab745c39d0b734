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
            "flux-dev",
            4096,
            512,
            768,
            "T5 v1.1 XXL encoder, last layer (final RMS norm), no attention mask; pooled: CLIP ViT-L/14's pooled output",
            "Flux.1 dev",
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
            space="flux",
            comfy_image_model="flux",
            pipeline="FluxPipeline",
            note="rows padded with T5's pad token and all read; see [Flux](flux.md)",
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


def family_for_shape(hidden: int, tokens: int) -> Family | None:
    """The family of a ``[1, tokens, hidden]`` tensor: PixArt-alpha (120 rows) and PixArt-sigma
    (300 rows) share T5-XXL's width 4096 and differ in their token count."""
    fam = family_for_hidden(hidden)
    if fam is not None and fam.tokens != int(tokens):
        fam = next((f for f in FAMILIES.values() if f.hidden == int(hidden) and f.tokens == int(tokens)), fam)
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
