"""A negative predictor: a per-prompt negative from the positive conditioning, at no UNet call.

``negative(c) = global + correction(c)``: the global negative (a learned embedding, trainable) plus a small
correction computed from the prompt's own conditioning, trained with the ReNeg objective over many prompts
(``reneg train --predictor``). Two architectures, both zero-initialised (an untrained predictor *is* its
global negative) and bounded (tanh or softmax features, so a strange prompt cannot blow the correction up):

- ``lowrank``: ``h = tanh(W f)`` from the prompt's pooled text features ``f`` (the mean of the rows it reads,
  and the family's pooled vector where it has one), ``correction = sum_k h_k U_k`` with ``U_k`` of the
  negative's shape: ``rank`` learned directions in the negative's space, mixed per prompt.
- ``xattn``: ``queries`` learned queries attend over the prompt's (layer-normed) token rows (the mask keeps
  T5 padding out); each row of the correction is a learned mix of the attended prompt vectors.

Both read the prompt *centred*: ``feature_mean`` (a buffer, ``[D (+ P)]``) is the mean over the training
prompts of the pooled features before their layer norm (the mean row, and the pooled vector), set once when
training starts (:func:`fit_feature_mean`) and stored in the file. It is taken from the pooled features and
from every row the attention reads before they are layer-normed, so that what all prompts share (most of a
CLIP prompt's 77 rows are padding after its end token, alike for every prompt) does not drown what tells
them apart. It needs nothing but the conditioning rows (and pooled vector) a host hands over. A zero
``feature_mean`` reads the prompt as format version 1 did: a version-1 file (which has none) loads with
zeros and gives exactly what it gave before.

For a family with a pooled vector (SDXL) the negative's pooled vector gets a low-rank correction from ``f``
as well. Only torch and safetensors are imported: the A1111 extension and the ComfyUI Load node use this.

The file (``.safetensors``) holds the global negative (``global.neg_embedding``, ``global.pooled``,
``global.attention_mask`` as an embedding file names them) and the predictor's tensors (``predictor.*``),
with string metadata saying the family, shapes and architecture numbers. Loading rebuilds the module from
those numbers only and requires every stored tensor to be exactly one the rebuilt module has, of its
shape: nothing in the file is code.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import __version__
from .embedding import (
    _DTYPES,
    MAX_FILE_BYTES,
    EmbeddingError,
    NegEmbedding,
    _same_space,
    implied_attention_mask,
    validate,
    validate_mask,
)
from .families import FAMILIES, get_family
from .fileio import atomic_save_safetensors, not_a_file, read_safetensors_header

FORMAT = "reneg-predictor"
FORMAT_VERSION = "2"  # 2: predictor.feature_mean; 1 (read too): none, the features uncentred
READ_VERSIONS = ("1", "2")
ARCHITECTURES = ("lowrank", "xattn")
RANK_MAX = 256  # rank (lowrank) or queries (xattn): a predictor is small
GLOBAL_KEYS = ("global.neg_embedding", "global.pooled", "global.attention_mask")


class PredictorError(EmbeddingError):
    """A predictor file is unreadable or not what it must be (an :class:`EmbeddingError`: front-ends that
    report a bad embedding file report a bad predictor file the same way)."""


@dataclass(frozen=True)
class PredictorSpec:
    """The numbers a predictor is rebuilt from (all of them are in the file's metadata)."""

    family: str
    architecture: str = "lowrank"
    rank: int = 4  # lowrank: directions; xattn: queries
    hidden: int = 0  # the family's width (0: the family's)
    tokens: int = 0  # the negative's rows (0: the family's)
    pooled: int = 0  # the pooled vector's size (0: none)

    def __post_init__(self):
        spec = get_family(self.family)
        object.__setattr__(self, "hidden", self.hidden or spec.hidden)
        object.__setattr__(self, "tokens", self.tokens or spec.tokens)
        object.__setattr__(self, "pooled", self.pooled or (spec.pooled or 0))
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown predictor architecture {self.architecture!r}; expected one of {', '.join(ARCHITECTURES)}"
            )
        if not 1 <= int(self.rank) <= RANK_MAX:
            raise ValueError(f"predictor rank must be from 1 to {RANK_MAX}, found {self.rank}")
        if self.hidden != spec.hidden:
            raise ValueError(f"family {self.family} has hidden size {spec.hidden}, found {self.hidden}")
        if self.pooled != (spec.pooled or 0):
            raise ValueError(f"family {self.family} has pooled size {spec.pooled or 0}, found {self.pooled}")

    @property
    def features(self) -> int:
        return self.hidden + self.pooled


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:])


class NegPredictor(torch.nn.Module):
    """``forward(rows [B, L', D], pooled [B, P] or None, mask [B, L'] or None) -> (neg [B, L, D], pooled
    [B, P] or None)``. ``L'`` is any number of rows (a host's 154 rows of a long prompt, T5's unpadded
    rows); the output has the global negative's rows."""

    def __init__(
        self,
        spec: PredictorSpec,
        global_rows: torch.Tensor,
        global_pooled: torch.Tensor | None = None,
        global_mask: torch.Tensor | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.spec = spec
        L, D, P, r = spec.tokens, spec.hidden, spec.pooled, spec.rank
        if tuple(global_rows.shape) != (1, L, D):
            raise ValueError(f"the global negative must be [1, {L}, {D}], found {list(global_rows.shape)}")
        self.base = torch.nn.Parameter(global_rows.detach().float().clone())
        if P:
            if global_pooled is None:
                raise ValueError(f"family {spec.family} needs the global negative's pooled vector [1, {P}]")
            self.base_pooled = torch.nn.Parameter(global_pooled.detach().float().reshape(1, P).clone())
        else:
            self.base_pooled = None
        if global_mask is None:
            global_mask = torch.ones(1, L)
        self.register_buffer("neg_mask", global_mask.detach().float().reshape(1, L).clone())
        g = torch.Generator().manual_seed(int(seed))
        # the read-in is random and fixed in scale; the read-out starts at zero: predictor == global at init
        self.w_in = torch.nn.Parameter(torch.randn(r, spec.features, generator=g) / math.sqrt(spec.features))
        if spec.architecture == "lowrank":
            self.up = torch.nn.Parameter(torch.zeros(r, L, D))
        else:
            self.queries = torch.nn.Parameter(torch.randn(r, D, generator=g))
            self.mix = torch.nn.Parameter(torch.zeros(L, r))
        self.up_pooled = torch.nn.Parameter(torch.zeros(r, P)) if P else None
        # what every prompt shares, taken away before the layer norms (zero: uncentred, format version 1)
        self.register_buffer("feature_mean", torch.zeros(spec.features))

    def raw_features(self, rows: torch.Tensor, pooled: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """The prompt's pooled text features before centring and layer norm: ``[B, D (+ P)]``, the mean of
        the rows it reads (and the pooled vector). Their mean over training prompts is ``feature_mean``."""
        x = rows.float()
        if mask is not None:
            m = mask.to(x.dtype)[..., None]
            mean = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        else:
            mean = x.mean(1)
        parts = [mean]
        if self.spec.pooled:
            if pooled is None:
                raise ValueError(f"a {self.spec.family} predictor reads the prompt's pooled vector; none was given")
            parts.append(pooled.float().reshape(x.shape[0], -1))
        return torch.cat(parts, -1)

    def features(self, rows: torch.Tensor, pooled: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """The prompt's pooled text features ``[B, D (+ P)]``: centred on ``feature_mean``, each part
        layer-normed."""
        f = self.raw_features(rows, pooled, mask) - self.feature_mean
        D = self.spec.hidden
        parts = [_norm(f[:, :D])] + ([_norm(f[:, D:])] if self.spec.pooled else [])
        return torch.cat(parts, -1) / math.sqrt(len(parts))

    def set_feature_mean(self, mean: torch.Tensor) -> None:
        """Set ``feature_mean`` (``[D (+ P)]``, finite): the mean of :meth:`raw_features` over the training
        prompts (:func:`fit_feature_mean`)."""
        mean = torch.as_tensor(mean).detach()
        if tuple(mean.shape) != tuple(self.feature_mean.shape) or not bool(torch.isfinite(mean).all()):
            raise ValueError(
                f"a {self.spec.family} predictor's feature mean is a finite [{self.spec.features}], "
                f"found {list(mean.shape)}"
            )
        with torch.no_grad():
            self.feature_mean.copy_(mean.to(self.feature_mean))

    def correction(
        self, rows: torch.Tensor, pooled: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt-dependent part: ``([B, L, D], [B, P] or None)``."""
        if rows.dim() != 3 or rows.shape[-1] != self.spec.hidden:
            raise ValueError(
                f"a {self.spec.family} predictor reads conditioning [B, tokens, {self.spec.hidden}], "
                f"found {list(rows.shape)}"
            )
        f = self.features(rows, pooled, mask)
        h = torch.tanh(f @ self.w_in.T)  # [B, r], bounded
        if self.spec.architecture == "lowrank":
            delta = torch.einsum("br,rld->bld", h, self.up)
        else:
            keys = _norm(rows.float() - self.feature_mean[: self.spec.hidden])
            scores = keys @ self.queries.T / math.sqrt(self.spec.hidden)  # [B, L', r]
            if mask is not None:
                scores = scores.masked_fill(~mask.bool()[..., None], float("-inf"))
            attn = scores.softmax(1)
            attended = attn.transpose(1, 2) @ keys  # [B, r, D]
            delta = self.mix @ attended  # [B, L, D]
        delta = delta * self.neg_mask[..., None]  # rows the model does not read stay as they are
        dp = h @ self.up_pooled if self.up_pooled is not None else None
        return delta, dp

    def forward(
        self, rows: torch.Tensor, pooled: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        delta, dp = self.correction(rows, pooled, mask)
        neg = self.base + delta
        return neg, (self.base_pooled + dp if dp is not None else None)

    def penalty(
        self, rows: torch.Tensor, pooled: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The regularisation towards the global negative: the correction's mean square per entry."""
        delta, dp = self.correction(rows, pooled, mask)
        p = delta.pow(2).mean()
        return p + dp.pow(2).mean() if dp is not None else p

    def global_embedding(self) -> NegEmbedding:
        mask = self.neg_mask.long() if get_family(self.spec.family).masked else None
        pooled = self.base_pooled.detach().cpu().clone() if self.base_pooled is not None else None
        return NegEmbedding(self.base.detach().cpu().clone(), self.spec.family, pooled, attention_mask=mask)

    def num_parameters(self) -> int:
        """The prompt-dependent part's size (the global negative not counted)."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("base"))


def from_embedding(emb: NegEmbedding, architecture: str = "lowrank", rank: int = 4, seed: int = 0) -> NegPredictor:
    """A zero-initialised predictor around a global negative (it predicts ``emb`` for every prompt). Its
    ``feature_mean`` is zero until :func:`fit_feature_mean` sets it."""
    spec = PredictorSpec(emb.family, architecture, rank)
    pooled = emb.pooled
    if spec.pooled and pooled is None:
        raise EmbeddingError(f"{emb.path or 'embedding'}: a {emb.family} predictor needs the pooled vector")
    return NegPredictor(spec, emb.model_rows(), pooled if spec.pooled else None, emb.mask(), seed)


@torch.no_grad()
def fit_feature_mean(model: NegPredictor, encode, texts, batch: int = 32, limit: int = 512) -> int:
    """Set ``model.feature_mean`` to the mean of its :meth:`~NegPredictor.raw_features` over ``texts`` (at most
    ``limit`` of them, evenly spaced: the same ones on every call), ``encode(list of texts) -> Cond`` giving
    each batch's conditioning. Returns how many prompts were read."""
    texts = list(texts)
    if not texts:
        raise ValueError("the feature mean needs at least one prompt")
    n = min(len(texts), int(limit))
    pick = [texts[i * len(texts) // n] for i in range(n)]
    total = torch.zeros(model.spec.features, dtype=torch.float64)
    for i in range(0, n, batch):
        c = encode(pick[i : i + batch])
        total += model.raw_features(c.crossattn, c.pooled, c.mask).double().sum(0).cpu()
    model.set_feature_mean((total / n).float())
    return n


# --- the file ------------------------------------------------------------------------------------------------


def save_predictor(path: str | os.PathLike, model: NegPredictor, overwrite: bool = False, **fields: Any) -> str:
    """Write a predictor atomically; extra keyword fields (how it was trained) go into the metadata."""
    path = str(path)
    if not path.endswith(".safetensors"):
        raise PredictorError(f"{path}: ReNeg predictors are written as .safetensors")
    spec = model.spec
    glob = model.global_embedding()
    rows, family, pooled = validate(glob.tensor, path, spec.family, glob.pooled)
    tensors = {"global.neg_embedding": rows}
    if pooled is not None:
        tensors["global.pooled"] = pooled
    if get_family(family).masked:
        tensors["global.attention_mask"] = validate_mask(glob.attention_mask, rows, path, family)
    for name, p in model.named_parameters():
        if not name.startswith("base"):
            t = p.detach().cpu().float()
            if not bool(torch.isfinite(t).all()):
                raise PredictorError(f"{path}: the predictor's {name} has NaN/inf values; not written")
            tensors[f"predictor.{name}"] = t
    mean = model.feature_mean.detach().cpu().float()
    if not bool(torch.isfinite(mean).all()):
        raise PredictorError(f"{path}: the predictor's feature_mean has NaN/inf values; not written")
    # uncentred (a zero mean): format version 1, which a ReNeg from before the feature mean reads too
    version = FORMAT_VERSION if bool(mean.any()) else "1"
    if version != "1":
        tensors["predictor.feature_mean"] = mean
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items() if v is not None}
    meta.update(
        format=FORMAT,
        format_version=version,
        family=family,
        kind="predictor",
        architecture=spec.architecture,
        rank=str(spec.rank),
        hidden_size=str(spec.hidden),
        token_count=str(spec.tokens),
        pooled_size=str(spec.pooled),
        parameters=str(model.num_parameters()),
    )
    meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    meta.setdefault("reneg_version", __version__)
    atomic_save_safetensors(path, tensors, metadata=meta, overwrite=overwrite)
    return path


def is_predictor_file(path: str | os.PathLike) -> bool:
    """Whether a file says it is a predictor (its safetensors metadata's ``format``); never raises."""
    try:
        header = read_safetensors_header(path)
    except Exception:
        return False
    meta = header.get("__metadata__")
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _int_field(path: str, meta: dict, key: str, lo: int, hi: int) -> int:
    raw = meta.get(key)
    if not isinstance(raw, str) or not raw.isdigit() or len(raw) > 9 or not lo <= int(raw) <= hi:
        raise PredictorError(f"{path}: metadata {key!r} must be an integer from {lo} to {hi}, found {str(raw)[:40]!r}")
    return int(raw)


def _spec_from_metadata(path: str, meta: dict, expected_family: str | None) -> PredictorSpec:
    if meta.get("format") != FORMAT:
        raise PredictorError(
            f"{path}: not a ReNeg predictor (expected metadata format {FORMAT!r}, found {str(meta.get('format'))[:40]!r})"
        )
    if meta.get("format_version") not in READ_VERSIONS:
        raise PredictorError(
            f"{path}: predictor format version {str(meta.get('format_version'))[:20]!r}; this ReNeg reads "
            f"versions {', '.join(READ_VERSIONS)}"
        )
    family = meta.get("family")
    if family not in FAMILIES:
        raise PredictorError(
            f"{path}: metadata names an unknown family {str(family)[:40]!r}; expected one of {', '.join(FAMILIES)}"
        )
    spec = FAMILIES[family]
    arch = meta.get("architecture")
    if arch not in ARCHITECTURES:
        raise PredictorError(
            f"{path}: unknown predictor architecture {str(arch)[:40]!r}; expected one of {', '.join(ARCHITECTURES)}"
        )
    hidden = _int_field(path, meta, "hidden_size", 1, 1 << 16)
    if hidden != spec.hidden:
        raise PredictorError(f"{path}: family {family} needs hidden size {spec.hidden}, found {hidden}")
    tokens = _int_field(path, meta, "token_count", 1, 4096)
    if tokens != spec.tokens:
        raise PredictorError(f"{path}: family {family} needs {spec.tokens} token rows, found {tokens}")
    pooled = _int_field(path, meta, "pooled_size", 0, 1 << 16)
    if pooled != (spec.pooled or 0):
        raise PredictorError(f"{path}: family {family} has pooled size {spec.pooled or 0}, found {pooled}")
    rank = _int_field(path, meta, "rank", 1, RANK_MAX)
    if expected_family and family != expected_family and not _same_space(family, expected_family):
        raise PredictorError(
            f"{path}: this is a {family} predictor (hidden size {hidden}), but the model in use is {expected_family}"
        )
    return PredictorSpec(family, arch, rank, hidden, tokens, pooled)


def load_predictor(path: str | os.PathLike, expected_family: str | None = None) -> NegPredictor:
    """Read a predictor file: the module is rebuilt from the metadata's numbers, then every stored tensor
    must be one of the rebuilt module's, of its shape, finite. Any failure is one :class:`PredictorError`
    naming the file, what was expected and what was found."""
    path = str(path)
    try:
        return _load(path, expected_family)
    except EmbeddingError:
        raise
    except Exception as e:  # untrusted content: any other failure is still a bad file
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise PredictorError(
            f"{path}: not a readable predictor file ({type(e).__name__}{': ' + detail if detail else ''})"
        ) from None


def _load(path: str, expected_family: str | None) -> NegPredictor:
    from safetensors.torch import load_file

    why = not_a_file(path)
    if why:
        raise PredictorError(f"{path}: {why}")
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise PredictorError(
            f"{path}: {size} bytes is far too large for a predictor (expected under {MAX_FILE_BYTES >> 20} MiB)"
        )
    try:
        header = read_safetensors_header(path)
    except ValueError as e:
        raise PredictorError(str(e)) from None
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise PredictorError(f"{path}: safetensors metadata is not a map of strings")
    spec = _spec_from_metadata(path, meta, expected_family)
    L, D = spec.tokens, spec.hidden
    placeholder = NegPredictor(
        spec, torch.zeros(1, L, D), torch.zeros(1, spec.pooled) if spec.pooled else None, None, seed=0
    )
    want = {f"predictor.{n}": list(p.shape) for n, p in placeholder.named_parameters() if not n.startswith("base")}
    version = meta["format_version"]
    if version != "1":  # version 1 has no feature mean: it reads the prompt uncentred (zero, as before)
        want["predictor.feature_mean"] = [spec.features]
    want["global.neg_embedding"] = [1, L, D]
    if spec.pooled:
        want["global.pooled"] = [1, spec.pooled]
    if get_family(spec.family).masked:
        want["global.attention_mask"] = [1, L]
    found = {k: v.get("shape") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    if set(found) != set(want):
        missing, extra = sorted(set(want) - set(found)), sorted(set(found) - set(want))
        raise PredictorError(
            f"{path}: a {spec.family} {spec.architecture} predictor of rank {spec.rank} (format version "
            f"{version}) holds "
            f"{', '.join(sorted(want))}; "
            + "; ".join(
                s
                for s in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unexpected {', '.join(extra)[:200]}" if extra else "",
                )
                if s
            )
        )
    for k, shape in want.items():
        if found[k] != shape:
            raise PredictorError(f"{path}: {k} must have shape {shape} for this predictor, found {found[k]}")
    tensors = load_file(path, device="cpu")
    for k, t in tensors.items():
        if k == "global.attention_mask":
            continue
        if t.dtype not in _DTYPES:
            raise PredictorError(f"{path}: {k} must hold float values, found {str(t.dtype).replace('torch.', '')}")
        if not bool(torch.isfinite(t).all()):
            raise PredictorError(f"{path}: {k} has NaN/inf values")
    rows, _, pooled = validate(tensors["global.neg_embedding"], path, spec.family, tensors.get("global.pooled"))
    mask = validate_mask(tensors.get("global.attention_mask"), rows, path, spec.family)
    if mask is None and get_family(spec.family).masked:
        mask = implied_attention_mask(rows)
    model = NegPredictor(spec, rows, pooled, mask, seed=0)
    state = {k[len("predictor.") :]: v.float() for k, v in tensors.items() if k.startswith("predictor.")}
    state["base"] = rows.float()
    if pooled is not None:
        state["base_pooled"] = pooled.float()
    state["neg_mask"] = model.neg_mask
    state.setdefault("feature_mean", model.feature_mean)  # version 1: zero, the features as they were
    model.load_state_dict(state, strict=True)
    model.metadata = dict(meta)
    model.path = path
    return model.eval().requires_grad_(False)


def predictor_info(path: str) -> dict[str, Any]:
    """What ``reneg inspect`` prints for a predictor file."""
    model = load_predictor(path)
    g = model.global_embedding()
    info = {
        "path": path,
        "format": FORMAT,
        **{k: v for k, v in asdict(model.spec).items()},
        "parameters": model.num_parameters(),
        "global": {
            "shape": list(g.tensor.shape),
            "pooled_shape": list(g.pooled.shape) if g.pooled is not None else None,
            "norm": float(g.tensor.double().norm()),
        },
        "feature_mean_norm": float(model.feature_mean.double().norm()),  # 0: uncentred (format version 1)
        "readout_norm": float(
            sum(p.double().pow(2).sum() for n, p in model.named_parameters() if n in ("up", "mix", "up_pooled")) ** 0.5
        ),
        "metadata": dict(sorted(model.metadata.items())),
    }
    return info


def predicted_cond(model: NegPredictor, cond, device=None):
    """The negative :class:`reneg.cond.Cond` for a batch of positive conds: one row of negatives per prompt,
    the global negative's mask (T5) and the predicted pooled vector (SDXL). Differentiable in ``model``."""
    from .cond import Cond

    device = device or cond.crossattn.device
    rows, pooled = model(cond.crossattn.to(device), None if cond.pooled is None else cond.pooled.to(device), cond.mask)
    b = rows.shape[0]
    mask = model.neg_mask.expand(b, -1).long() if get_family(model.spec.family).masked else None
    return Cond(rows, pooled, {}, mask)


@torch.no_grad()
def predicted_scores(
    backend, reward, model: NegPredictor, prompts, seeds, steps, guidance, height, width, batch=4, keep_images=False
):
    """:func:`reneg.generate.generate_and_score` with each prompt's own predicted negative."""
    from .generate import generate, seeded_noise

    scores, images = [], []
    for i in range(0, len(prompts), batch):
        p, s = prompts[i : i + batch], seeds[i : i + batch]
        cond = backend.encode_prompts(p)
        img = generate(
            backend, cond, predicted_cond(model, cond), seeded_noise(backend, s, height, width), steps, guidance
        )
        scores.append(reward(img, p).float().cpu())
        if keep_images:
            images.append(img.cpu())
    out = torch.cat(scores)
    return (out, torch.cat(images)) if keep_images else out
