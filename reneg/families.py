"""Model families a negative embedding can belong to (FIELD-NOTES 3).

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
    # T5 families: rows past the text's own tokens are padding the model ignores through an
    # attention mask, which travels with the rows (``Cond.mask``, the file's ``attention_mask``)
    masked: bool = False
    space: str = ""  # families sharing a text-encoder output space (and so their negatives)
    comfy_image_model: str = ""  # ComfyUI's unet_config["image_model"] for models it tells apart that way

    @property
    def text_space(self) -> str:
        return self.space or self.name


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd1", 768, 77, None, "CLIP ViT-L/14 (OpenAI), last layer, final layer norm",
               "Stable Diffusion 1.x"),
        Family("sd2", 1024, 77, None, "OpenCLIP ViT-H/14, penultimate layer, final layer norm",
               "Stable Diffusion 2.x"),
        Family("sdxl", 2048, 77, 1280, "CLIP ViT-L/14 + OpenCLIP ViT-bigG/14, penultimate layers",
               "Stable Diffusion XL"),
        Family("pixart", 4096, 120, None, "T5 v1.1 XXL encoder, last layer (final RMS norm), attention mask",
               "PixArt-alpha", masked=True, space="t5xxl", comfy_image_model="pixart_alpha"),
        Family("pixart-sigma", 4096, 300, None,
               "T5 v1.1 XXL encoder, last layer (final RMS norm), attention mask", "PixArt-sigma",
               masked=True, space="t5xxl", comfy_image_model="pixart_sigma"),
        Family("tiny", 64, 77, None, "small CLIP text model (demo world and tests)",
               "ReNeg's built-in demo world"),
    )
}

BY_HIDDEN: dict[int, Family] = {}
for _f in FAMILIES.values():  # the first family of a width is the one a bare file of that width is
    BY_HIDDEN.setdefault(_f.hidden, _f)


def family_for_hidden(hidden: int) -> Family | None:
    return BY_HIDDEN.get(int(hidden))


def family_for_shape(hidden: int, tokens: int) -> Family | None:
    """The family of a ``[1, tokens, hidden]`` tensor: PixArt-alpha (120 rows) and PixArt-sigma
    (300 rows) share T5-XXL's width 4096 and differ in their token count."""
    fam = family_for_hidden(hidden)
    if fam is not None and fam.tokens != int(tokens):
        fam = next((f for f in FAMILIES.values() if f.hidden == int(hidden) and f.tokens == int(tokens)), fam)
    return fam


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown family {name!r}; expected one of {', '.join(sorted(FAMILIES))}"
        ) from None


def known_hidden_sizes() -> str:
    return ", ".join(f"{h} ({'/'.join(f.name for f in FAMILIES.values() if f.hidden == h)})" for h in BY_HIDDEN)


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
