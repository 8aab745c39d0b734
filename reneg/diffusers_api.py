"""A ReNeg file as the keyword arguments a diffusers pipeline's ``__call__`` takes.

::

    import reneg
    images = pipe(**reneg.load_negative(pipe, "sd1.5_reneg_emb.bin", prompts)).images

:func:`load_negative` reads the file (our ``.safetensors``, the paper's ``.bin``, any format
:func:`reneg.embedding.load_embedding` reads), checks that its family is the pipeline's, and returns
``negative_prompt_embeds`` and, where the pipeline reads them, ``negative_pooled_prompt_embeds`` (SDXL)
and ``negative_prompt_attention_mask`` (PixArt), batched for the prompts, on the pipeline's execution
device, in the dtype its text encoder computes in; with the prompt itself in the form the pipeline
takes beside them.

Import-light: torch and safetensors, as the rest of the core files; diffusers is only ever touched
through the pipeline object the caller passes (the trainer, the rewards and the model loaders are
never imported).

How a family plugs in (nothing below names a family):

* The family table (:mod:`reneg.families`) recognises the pipeline: ``Family.pipeline`` (the
  pipeline's class name, or a base class's), otherwise ``Family.encoders`` (the widths of
  ``text_encoder``, ``text_encoder_2``). ``Family.pooled`` says that a pooled vector travels,
  ``Family.masked`` that the rows carry an attention mask (padded with zero rows the mask leaves out,
  to the pipeline's row count), ``Family.tokens`` how many rows the pipeline encodes a prompt to.
* One function per family, registered with :func:`pipeline_text`, encodes texts the way the
  pipeline's own ``encode_prompt`` does. It gives the empty prompt, needed for a strength below 1
  (the blend with the empty prompt, as the ComfyUI Load node does) and for a file without a part the
  pipeline needs (an SDXL file without its pooled vector); and the prompt, for a pipeline that refuses
  a prompt text beside ``negative_prompt_embeds`` (``prompt_as_embeds``). At strength 1, a file that
  carries everything on a pipeline that takes a prompt text needs no such function.
* The pipeline's own argument names come from its ``__call__`` signature (:data:`POOLED_ARGS` and
  :data:`MASK_ARGS` list the spellings diffusers uses).

Other kinds of ReNeg file: :data:`READERS` holds functions
``reader(path, pipe, family, prompts) -> Negative | None``, tried in order before the embedding
reader; each returns None for a file that is not its kind. A negative-token file (input-token vectors
for the text encoder) is read by running its vectors through the pipeline's encoder
(:func:`_read_tokens`); a per-prompt predictor file returns one negative per prompt
(``Negative.embeds`` ``[B, L, D]``, :func:`_read_predictor`). Everything after
reading (rows, blend, batch, dtype, argument names) is the same for every kind.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import torch

from .embedding import EmbeddingError, load_embedding, validate
from .families import FAMILIES, Family, describe_hidden
from .uncond import blend, match_tokens

__all__ = ["PIPELINE_TEXT", "READERS", "Negative", "PipelineText", "load_negative", "pipeline_family", "pipeline_text"]


class Negative(NamedTuple):
    """A negative in a pipeline's terms: ``embeds`` ``[1 or B, L, D]``, ``pooled`` ``[1 or B, P]``
    or None, ``mask`` ``[1 or B, L]`` (1 = a row the model reads) or None."""

    embeds: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None


Reader = Callable[[str, Any, Family, Optional[list]], Optional[Negative]]
Encode = Callable[[Any, list, torch.device, int], Negative]


class PipelineText(NamedTuple):
    """What :func:`load_negative` needs to know of one family's pipelines beyond the family table.

    ``encode(pipe, texts, device, rows)``: the pipeline's own encoding of ``texts`` (its
    ``encode_prompt``, without guidance) as a :class:`Negative` with one row per text, ``rows`` being
    the row count it encodes prompts to. ``prompt_as_embeds``: the pipeline refuses a ``prompt`` text
    beside ``negative_prompt_embeds`` (PixArt, and many newer pipelines), so a prompt is passed to it as
    its encoding."""

    encode: Encode
    prompt_as_embeds: bool = False
    bool_mask: bool = False  # the pipeline's attention takes the mask as booleans (Chroma), not 0/1 integers


def _read_tokens(path: str, pipe, family: Family, prompts: Optional[list]) -> Optional[Negative]:
    """A negative-token (textual-inversion) file: its vectors through the pipeline's own text encoder(s),
    placed as diffusers' ``load_textual_inversion`` and the UIs place them (the file's name alone as the
    negative prompt); SDXL's pooled vector from the second encoder, as the pipeline makes it."""
    from .tokens import TokenEncoder, TokenError, load_tokens, looks_like_tokens

    if not looks_like_tokens(path):
        return None
    try:
        tok = load_tokens(path, expected_family=family.name)
        enc = TokenEncoder(_PipelineEncoders(pipe, family))
    except TokenError as e:
        raise EmbeddingError(str(e)) from None
    with torch.no_grad():
        rows, pooled = enc.encode(tok.flat().to(_device(pipe)))
    return Negative(rows.float().cpu(), None if pooled is None else pooled.float().cpu())


class _PipelineEncoders:
    """What :class:`reneg.tokens.TokenEncoder` reads of a backend, from a diffusers pipeline."""

    def __init__(self, pipe, family: Family):
        self.family = family.name
        self.text_encoder, self.tokenizer = pipe.text_encoder, pipe.tokenizer
        self.text_encoder_2 = getattr(pipe, "text_encoder_2", None)
        self.tokenizer_2 = getattr(pipe, "tokenizer_2", None)
        self.device = _device(pipe)


def _read_predictor(path: str, pipe, family: Family, prompts: Optional[list]) -> Optional[Negative]:
    """A per-prompt negative predictor: each prompt's own negative, from the pipeline's own encoding of
    the prompt (the conditioning the predictor was trained on)."""
    from .predictor import is_predictor_file, load_predictor

    if not is_predictor_file(path):
        return None
    model = load_predictor(path, expected_family=family.name)  # another family's: refused naming both
    if not prompts:
        raise ValueError(f"{path}: a predictor gives each prompt its own negative; give load_negative the prompts")
    text = PIPELINE_TEXT.get(family.name)
    if text is None or not _text_encoders(pipe):
        raise ValueError(
            f"{path}: a predictor reads the prompts' encoding, which ReNeg does not make for {_name(pipe)}"
        )
    with torch.no_grad():
        pos = text.encode(pipe, list(prompts), _device(pipe), family.tokens)
        rows, pooled = model(
            pos.embeds.float().cpu(),
            None if pos.pooled is None else pos.pooled.float().cpu(),
            None if pos.mask is None else pos.mask.cpu(),
        )
    mask = model.neg_mask.expand(rows.shape[0], -1).long() if family.masked else None
    return Negative(rows.detach(), None if pooled is None else pooled.detach(), mask)


READERS: list[Reader] = [_read_tokens, _read_predictor]
"""Readers of other kinds of ReNeg file, tried in order before the embedding reader (see the module
docstring): ``reader(path, pipe, family, prompts)`` returns a :class:`Negative` (CPU, float32, rows
as the family's file has them) or None when the file is not its kind."""

PIPELINE_TEXT: dict[str, PipelineText] = {}
"""Family name -> its :class:`PipelineText` (registered with :func:`pipeline_text`)."""

POOLED_ARGS = ("negative_pooled_prompt_embeds",)
MASK_ARGS = ("negative_prompt_attention_mask", "negative_prompt_embeds_mask")


def pipeline_text(
    *families: str, prompt_as_embeds: bool = False, bool_mask: bool = False
) -> Callable[[Encode], Encode]:
    """Register ``encode(pipe, texts, device, rows) -> Negative`` for ``families`` (see :class:`PipelineText`)."""

    def register(fn: Encode) -> Encode:
        for name in families:
            if name not in FAMILIES:
                raise ValueError(f"pipeline_text: {name!r} is not a family in reneg.families")
            PIPELINE_TEXT[name] = PipelineText(fn, prompt_as_embeds, bool_mask)
        return fn

    return register


# --- the pipelines' own text encoding, one function per encode_prompt signature -------------------


@pipeline_text("sd1", "sd2", "tiny")
def _clip_text(pipe, texts: list, device: torch.device, rows: int) -> Negative:
    """StableDiffusionPipeline, AnimateDiffPipeline, TextToVideoSDPipeline."""
    embeds, _ = pipe.encode_prompt(texts, device, 1, False)
    return Negative(embeds)


@pipeline_text("sdxl")
def _sdxl_text(pipe, texts: list, device: torch.device, rows: int) -> Negative:
    """StableDiffusionXLPipeline. ``[""]`` gives the encoding of the empty prompt (what the UIs and
    ReNeg's training use), not the zeros the pipeline substitutes when no negative prompt is given."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return Negative(embeds, pooled)


@pipeline_text("pixart", "pixart-sigma", prompt_as_embeds=True)
def _t5_text(pipe, texts: list, device: torch.device, rows: int) -> Negative:
    """PixArtAlphaPipeline / PixArtSigmaPipeline: padded to ``rows`` tokens, with the attention mask."""
    embeds, mask, _, _ = pipe.encode_prompt(texts, False, device=device, clean_caption=False, max_sequence_length=rows)
    return Negative(embeds, None, mask)


@pipeline_text("wan")
def _wan_text(pipe, texts: list, device: torch.device, rows: int) -> Negative:
    """WanPipeline: UMT5 rows zero-padded to ``rows`` (no mask; the transformer reads every row)."""
    embeds, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, max_sequence_length=rows, device=device)
    return Negative(embeds)


@pipeline_text("flux-dev", "flux-schnell")
def _flux_text(pipe, texts: list, device: torch.device, rows: int) -> Negative:
    """FluxPipeline: T5 rows padded to ``rows`` and CLIP-L's pooled vector."""
    embeds, pooled, _ = pipe.encode_prompt(texts, texts, device=device, max_sequence_length=rows)
    return Negative(embeds, pooled)


@pipeline_text("chroma", bool_mask=True)
def _chroma_text(pipe, texts: list, device: torch.device, rows: int) -> Negative:
    """ChromaPipeline: T5 rows with its mask (the text and one padding row). The mask goes to the
    pipeline as booleans: its attention takes an integer mask not at all, and a float one (what its own
    ``encode_prompt`` returns) as an additive bias, so a 0/1 float mask reads every row."""
    embeds, _, mask, _, _, _ = pipe.encode_prompt(
        texts, device=device, do_classifier_free_guidance=False, max_sequence_length=rows
    )
    return Negative(embeds, None, mask)


@pipeline_text("qwen-image")
def _qwen_image_text(pipe, texts: list, device: torch.device, rows: int) -> Negative:
    """QwenImagePipeline: Qwen2.5-VL rows with the template's system part dropped, and their mask."""
    embeds, mask = pipe.encode_prompt(texts, device=device)
    return Negative(embeds, None, mask)


# --- the pipeline -------------------------------------------------------------------------------


def _name(pipe) -> str:
    return type(pipe).__name__


def _text_encoders(pipe) -> list:
    return [t for t in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if t is not None]


def pipeline_family(pipe) -> Family:
    """The family of a diffusers pipeline object, from the family table: the pipeline's class (or a
    base class) named by ``Family.pipeline``, else its text encoders' widths (``Family.encoders``,
    checked against the UNet as when ReNeg loads a folder), else, for a pipeline loaded without text
    encoders, the UNet's cross-attention width."""
    names = {c.__name__ for c in type(pipe).__mro__}
    fam = next((f for f in FAMILIES.values() if f.pipeline and f.pipeline in names), None)
    if fam is not None:
        return fam
    unet = getattr(pipe, "unet", None)
    encoders = _text_encoders(pipe)
    known = "; ".join(
        f"{f.description} ({f.pipeline or 'text encoders ' + ' + '.join(map(str, f.encoders)) + ' wide'})"
        for f in FAMILIES.values()
        if f.pipeline or f.encoders
    )
    if unet is None or not hasattr(unet, "config"):
        raise ValueError(f"{_name(pipe)}: not a pipeline ReNeg knows (no UNet, and not one of: {known})")
    if encoders:
        from .backends.diffusers_backend import ModelLoadError
        from .backends.parts import family_of

        try:
            return FAMILIES[family_of(encoders, unet, _name(pipe))]
        except ModelLoadError as e:
            raise ValueError(f"{e}; ReNeg knows: {known}") from None
    xattn = unet.config.cross_attention_dim
    xattn = int(xattn[0] if isinstance(xattn, (list, tuple)) else xattn)
    text_time = getattr(unet.config, "addition_embed_type", None) == "text_time"
    fam = next(
        (f for f in FAMILIES.values() if f.encoders and f.hidden == xattn and (f.pooled is not None) == text_time),
        None,
    )
    if fam is None:
        raise ValueError(
            f"{_name(pipe)}: its UNet reads text conditioning {describe_hidden(xattn)} wide, which is not "
            f"a family ReNeg knows ({known})"
        )
    return fam


def _call_args(pipe) -> dict:
    """The parameters of the pipeline's ``__call__``: name -> default."""
    try:
        params = inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):  # pragma: no cover - every diffusers pipeline has a signature
        return {}
    return {name: p.default for name, p in params.items()}


def _device(pipe) -> torch.device:
    dev = getattr(pipe, "_execution_device", None) or getattr(pipe, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def _dtype(pipe) -> torch.dtype:
    """The dtype the pipeline's prompt embeddings come in: its text encoder's (diffusers' rule),
    else its denoiser's."""
    for name in ("text_encoder", "text_encoder_2", "transformer", "unet"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    return torch.float32


# --- the file -----------------------------------------------------------------------------------


def _read_embedding(path: str, pipe, family: Family, prompts: Optional[list]) -> Negative:
    """Any file :func:`reneg.embedding.load_embedding` reads, checked against the pipeline's family."""
    emb = load_embedding(path)
    try:
        validate(emb.tensor, path, emb.family, emb.pooled, expected_family=family.name)
    except EmbeddingError:
        spec = emb.family_spec
        raise EmbeddingError(
            f"{path}: this is a {emb.family} embedding ({spec.description}, hidden size {spec.hidden}), "
            f"but {_name(pipe)} is a {family.name} pipeline ({family.description}, hidden size "
            f"{family.hidden}); use an embedding made for {family.description}"
        ) from None
    return Negative(emb.model_rows().float(), None if emb.pooled is None else emb.pooled.float(), emb.mask())


def _read(path: str, pipe, family: Family, prompts: Optional[list]) -> Negative:
    for reader in READERS:
        neg = reader(path, pipe, family, prompts)
        if neg is not None:
            return neg
    return _read_embedding(path, pipe, family, prompts)


# --- rows, blend, batch -------------------------------------------------------------------------


def _fit_rows(neg: Negative, family: Family, rows: int, what: str) -> Negative:
    """``neg`` with ``rows`` token rows. Unmasked (CLIP) rows are repeated in blocks, which leaves the
    cross-attention output unchanged; masked (T5) rows are padded with zero rows the mask leaves out,
    or cut where the mask reads no row past ``rows``."""
    x = neg.embeds
    n = x.shape[1]
    if n == rows:
        return neg
    if not family.masked and family.joint:  # joint attention (Flux): repeated rows would weigh the text twice
        raise ValueError(
            f"{what}: {n} token rows, and this pipeline encodes prompts to {rows}; give max_sequence_length={n} "
            f"here and to the pipeline"
        )
    if not family.masked:
        try:
            return neg._replace(embeds=match_tokens(x, rows))
        except ValueError:
            raise ValueError(
                f"{what}: its {n} token rows can not be matched to the prompt's {rows} (a multiple of {n} is needed)"
            ) from None
    mask = neg.mask if neg.mask is not None else torch.ones(x.shape[:2], dtype=torch.long)
    if n < rows:
        x = torch.cat([x, x.new_zeros(x.shape[0], rows - n, x.shape[2])], dim=1)
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], rows - n)], dim=1)
    else:
        read = int(mask.sum(dim=0).nonzero().max()) + 1 if bool(mask.any()) else 1
        if read > rows:
            raise ValueError(
                f"{what}: its attention mask reads {read} rows, but this pipeline encodes prompts to {rows} "
                f"(max_sequence_length); give max_sequence_length={read} or more"
            )
        x, mask = x[:, :rows], mask[:, :rows]
    return Negative(x, neg.pooled, mask)


def _blend(base: Negative, neg: Negative, strength: float, what: str, pipe) -> Negative:
    """``base + strength * (neg - base)`` on the rows and the pooled vector (:func:`reneg.uncond.blend`,
    as the ComfyUI Load node does). T5 rows are blended only where the two masks read the same rows."""
    b = max(base.embeds.shape[0], neg.embeds.shape[0])

    def lerp(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:  # [B, L, D] rows, or [B, P] pooled vectors
        flat = a.dim() == 2
        a, e = (a[:, None], e[:, None]) if flat else (a, e)
        out = blend(a.float().expand(b, *a.shape[1:]), e.float(), strength)
        return out[:, 0] if flat else out

    mask = neg.mask
    if base.mask is not None or neg.mask is not None:
        bm, nm = base.mask, neg.mask
        same = bm is not None and nm is not None and torch.equal(bm.expand(b, -1).long(), nm.expand(b, -1).long())
        if not same and 0.0 < strength < 1.0:
            read = int(nm.sum(dim=1).max()) if nm is not None else neg.embeds.shape[1]
            raise ValueError(
                f"{what}: strength {strength}: its attention mask reads {read} rows and {_name(pipe)}'s empty "
                f"prompt reads {int(bm.sum(dim=1).max()) if bm is not None else base.embeds.shape[1]}; T5 rows "
                f"of different prompts can be swapped (strength 1) or kept (strength 0), not blended"
            )
        mask = base.mask if strength == 0.0 else neg.mask
    pooled = neg.pooled
    if base.pooled is not None:
        pooled = base.pooled if neg.pooled is None else lerp(base.pooled, neg.pooled)
    return Negative(lerp(base.embeds, neg.embeds), pooled, mask)


def _batch(prompt, prompt_embeds) -> int:
    if prompt_embeds is not None:
        return int(prompt_embeds.shape[0])
    if prompt is None or isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return len(prompt)
    raise TypeError(f"prompt must be a string or a non-empty list of strings, found {type(prompt).__name__}")


def _check_strength(strength: float) -> float:
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"strength must be a number between 0 and 1, found {strength!r}") from None
    if not 0.0 <= s <= 1.0:  # NaN fails too
        raise ValueError(f"strength must be between 0 and 1 (0 = the empty prompt, 1 = the file), found {strength}")
    return s


def load_negative(
    pipe,
    path: Union[str, os.PathLike],
    prompt: Union[str, Sequence[str], None] = None,
    *,
    strength: float = 1.0,
    prompt_embeds: Optional[torch.Tensor] = None,
    max_sequence_length: Optional[int] = None,
) -> dict[str, Any]:
    """The keyword arguments that make ``pipe`` generate ``prompt`` with the negative in ``path``::

        images = pipe(**reneg.load_negative(pipe, "neg.safetensors", prompts), num_inference_steps=30).images

    Args:
        pipe: a diffusers pipeline object of a family ReNeg supports: ``StableDiffusionPipeline``
            (SD1.x, SD2.x) and its img2img / inpaint siblings, ``StableDiffusionXLPipeline`` and its
            siblings, ``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``, ``AnimateDiffPipeline``,
            ``TextToVideoSDPipeline`` (ZeroScope), ``WanPipeline``, ``FluxPipeline`` (the negative acts
            at ``true_cfg_scale`` above 1), ``ChromaPipeline``, ``QwenImagePipeline`` (``true_cfg_scale``
            above 1), and any pipeline whose text encoders are one of these families'.
        path: a ReNeg embedding (``.safetensors``, the paper's ``.bin``, a file another tool saved
            ``negative_prompt_embeds`` in); see the module docstring for other kinds.
        prompt: the prompt or list of prompts. It is returned among the keyword arguments, as
            ``prompt`` or, for a pipeline that refuses a prompt text beside ``negative_prompt_embeds``
            (PixArt), as the pipeline's own ``prompt_embeds`` and ``prompt_attention_mask``; so give the
            prompt here, not to the pipeline. There is one negative per prompt, as the pipeline needs
            (``num_images_per_prompt`` the pipeline repeats itself).
        strength: 1 = the file's negative, 0 = the pipeline's encoding of the empty prompt
            (``negative_prompt=""``), linear between (T5 rows blend only where both read the same rows).
        prompt_embeds: when the pipeline is called with ``prompt_embeds`` of your own instead: the
            batch and row count are taken from it (a CLIP negative is repeated to a long prompt's 77 k
            rows) and so is the dtype; no prompt is returned.
        max_sequence_length: T5 pipelines: the ``max_sequence_length`` the pipeline is called with
            (default: the family's, 120 for PixArt-alpha, 300 for PixArt-sigma, 512 for Wan, Flux dev and
            Chroma; Flux schnell is called with 256).

    Returns:
        ``negative_prompt_embeds`` ``[B, L, D]``; ``negative_pooled_prompt_embeds`` ``[B, P]`` for SDXL
        (the file's pooled vector, or the empty prompt's where the file has none);
        ``negative_prompt_attention_mask`` ``[B, L]`` for PixArt; and the prompt as described above.
        Tensors are on the pipeline's execution device, in its text encoder's dtype.

    Raises:
        reneg.embedding.EmbeddingError: the file is unreadable, not a negative, of another family than
            the pipeline, or holds values that overflow the pipeline's dtype (the message names the file,
            what was expected and what was found).
        ValueError: a pipeline ReNeg does not know, a strength outside 0..1, rows that do not fit.
    """
    path = os.fspath(path)
    s = _check_strength(strength)
    batch = _batch(prompt, prompt_embeds)
    family = pipeline_family(pipe)
    args = _call_args(pipe)
    if args and "negative_prompt_embeds" not in args:
        raise ValueError(f"{_name(pipe)}.__call__ takes no negative_prompt_embeds; ReNeg can not give it a negative")
    text = PIPELINE_TEXT.get(family.name)
    device = _device(pipe)
    dtype = prompt_embeds.dtype if prompt_embeds is not None else _dtype(pipe)
    rows = int(prompt_embeds.shape[1]) if prompt_embeds is not None else int(max_sequence_length or family.tokens)
    prompts = [prompt] * batch if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)

    def encode(texts: list, why: str) -> Negative:
        if text is None:
            raise ValueError(
                f"{path}: {why} needs {_name(pipe)}'s own text encoding, which ReNeg does not make for "
                f"{family.description} pipelines yet"
            )
        if not _text_encoders(pipe):
            raise ValueError(
                f"{path}: {why} needs {_name(pipe)}'s text encoder, and the pipeline was loaded without one"
            )
        with torch.no_grad():
            return _fit_rows(text.encode(pipe, texts, device, rows), family, rows, f"{_name(pipe)}'s encoding")

    neg = _fit_rows(_read(path, pipe, family, prompts), family, rows, path)
    if neg.embeds.shape[0] not in (1, batch):
        raise ValueError(f"{path}: gives {neg.embeds.shape[0]} negatives for {batch} prompts")
    pooled_arg = next((a for a in POOLED_ARGS if a in args), None) if family.pooled else None
    mask_arg = next((a for a in MASK_ARGS if a in args), None) if family.masked else None
    if s < 1.0 or (pooled_arg and neg.pooled is None):
        why = f"strength {s}" if s < 1.0 else "a file without a pooled vector"
        base = encode([""], why)
        neg = _blend(Negative(*(None if t is None else t.detach().cpu() for t in base)), neg, s, path, pipe)
    _check_finite(neg, dtype, path, pipe)

    def mask_type(m: torch.Tensor) -> torch.Tensor:
        return m.bool() if text is not None and text.bool_mask else m.long()

    def batched(t: torch.Tensor) -> torch.Tensor:
        return t.expand(batch, *t.shape[1:]).contiguous() if t.shape[0] == 1 else t

    out: dict[str, Any] = {}
    if prompts is not None and prompt_embeds is None:
        if text is not None and text.prompt_as_embeds:
            pos = encode(prompts, "a prompt for this pipeline")
            out["prompt_embeds"] = pos.embeds.to(device=device, dtype=dtype)
            if pooled_arg and pos.pooled is not None:
                out[pooled_arg.replace("negative_", "", 1)] = pos.pooled.to(device=device, dtype=dtype)
            if mask_arg and pos.mask is not None:
                out[mask_arg.replace("negative_", "", 1)] = mask_type(pos.mask).to(device=device)
        else:
            out["prompt"] = prompt if isinstance(prompt, str) else list(prompt)
    if args.get("negative_prompt", None) not in (None, inspect.Parameter.empty):
        out["negative_prompt"] = None  # PixArt's default "" would clash with negative_prompt_embeds
    out["negative_prompt_embeds"] = batched(neg.embeds).to(device=device, dtype=dtype)
    if pooled_arg and neg.pooled is not None:
        out[pooled_arg] = batched(neg.pooled.reshape(neg.pooled.shape[0], -1)).to(device=device, dtype=dtype)
    if mask_arg and neg.mask is not None:
        out[mask_arg] = batched(mask_type(neg.mask)).to(device=device)
    return out


def _check_finite(neg: Negative, dtype: torch.dtype, path: str, pipe) -> None:
    """Refuse values that are finite as stored but inf in the dtype the pipeline computes in."""
    for what, t in (("values", neg.embeds), ("pooled vector", neg.pooled)):
        if t is not None and not bool(torch.isfinite(t.to(dtype)).all()):
            raise EmbeddingError(
                f"{path}: its {what} reach {float(t.abs().max()):.3g}, beyond {str(dtype).replace('torch.', '')}'s "
                f"largest {torch.finfo(dtype).max:.6g}, the dtype {_name(pipe)} computes in; a negative "
                f"embedding's values are normally well under 100"
            )
