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


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd1", 768, 77, None, "CLIP ViT-L/14 (OpenAI), last layer, final layer norm",
               "Stable Diffusion 1.x"),
        Family("sd2", 1024, 77, None, "OpenCLIP ViT-H/14, penultimate layer, final layer norm",
               "Stable Diffusion 2.x"),
        Family("sdxl", 2048, 77, 1280, "CLIP ViT-L/14 + OpenCLIP ViT-bigG/14, penultimate layers",
               "Stable Diffusion XL"),
        Family("pixart", 4096, 120, None, "T5-XXL encoder", "PixArt-alpha"),
        Family("tiny", 64, 77, None, "small CLIP text model (demo world and tests)",
               "ReNeg's built-in demo world"),
    )
}

BY_HIDDEN: dict[int, Family] = {f.hidden: f for f in FAMILIES.values()}


def family_for_hidden(hidden: int) -> Family | None:
    return BY_HIDDEN.get(int(hidden))


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown family {name!r}; expected one of {', '.join(sorted(FAMILIES))}"
        ) from None


def known_hidden_sizes() -> str:
    return ", ".join(f"{f.hidden} ({f.name})" for f in FAMILIES.values())
