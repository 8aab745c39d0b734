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


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd1", 768, 77, None, "CLIP ViT-L/14 (OpenAI), last layer, final layer norm",
               "Stable Diffusion 1.x", (768,)),
        Family("sd2", 1024, 77, None, "OpenCLIP ViT-H/14, penultimate layer, final layer norm",
               "Stable Diffusion 2.x", (1024,)),
        Family("sdxl", 2048, 77, 1280, "CLIP ViT-L/14 + OpenCLIP ViT-bigG/14, penultimate layers",
               "Stable Diffusion XL", (768, 1280)),
        Family("pixart", 4096, 120, None, "T5-XXL encoder", "PixArt-alpha"),
        Family("tiny", 64, 77, None, "small CLIP text model (demo world and tests)",
               "ReNeg's built-in demo world", (64,)),
    )
}

BY_HIDDEN: dict[int, Family] = {f.hidden: f for f in FAMILIES.values()}


def family_for_hidden(hidden: int) -> Family | None:
    return BY_HIDDEN.get(int(hidden))


def family_for_encoders(widths: tuple[int, ...]) -> Family | None:
    """The family whose text encoders have these hidden sizes, in order."""
    widths = tuple(int(w) for w in widths)
    return next((f for f in FAMILIES.values() if f.encoders and f.encoders == widths), None)


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown family {name!r}; expected one of {', '.join(sorted(FAMILIES))}"
        ) from None


def known_hidden_sizes() -> str:
    return ", ".join(f"{f.hidden} ({f.name})" for f in FAMILIES.values())


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
