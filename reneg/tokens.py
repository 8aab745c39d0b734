"""Negative tokens: a learned negative as N input-token vectors (textual-inversion form).

A ReNeg embedding is the text encoder's *output* for the negative branch (77 x 768 for SD1.5), which only
software that knows that form can use. Every UI already loads textual-inversion (TI) files by name in the
negative prompt, so the same negative as N vectors in the text encoder's *input* space works everywhere.

The conditioning a UI builds from a TI name alone as the negative prompt is, per text encoder, the
sequence ``BOS, v_1 .. v_N, EOS, PAD ...`` (77 positions) pushed through the frozen encoder:

- ComfyUI (``comfy/sd1_clip.py``) splices the vectors in where the name stood, after the start token; the
  end token follows and the chunk is padded to 77 with the tokenizer's pad token (the end token for
  CLIP-L, ``!``/0 for OpenCLIP-H and bigG); the pooled vector is read at the end token.
- A1111/Forge write the vectors into the token-embedding output at the name's place (token ids 0 there),
  pad with the end token (CLIP-L) or 0 (OpenCLIP); SDXL's pooled vector is read at the largest id, i.e.
  the end token.
- diffusers' ``load_textual_inversion`` adds N new tokens whose input rows are the vectors; the tokenizer
  pads as the model's tokenizer config says (the same tokens as above for the released SD1.5, SD2 and SDXL
  folders). Its pooled vector (SDXL) follows transformers: at the first end token, except for text
  encoders whose config still says ``eos_token_id: 2`` (the released SDXL folders among them), where it
  is read at the largest token id, which is then the last added token.

:class:`TokenEncoder` reproduces exactly that sequence with the model's own tokenizer and text encoder
(the positions of the vectors carry id 0, as in A1111, so the pooled vector is read at the end token in
every code path of transformers), and reads the family's layer as the backend does: SD1.x (and the
demo world) the last layer with the final layer norm; SD2.x the penultimate layer with the final layer norm
(diffusers' SD2 text encoders stop one layer early); SDXL both encoders' penultimate layers without it, side
by side, and bigG's projected pooled vector.

Files (this module imports only torch and safetensors; the encoder imports nothing more either, it runs
the model objects it is given):

- SD1.x/SD2.x ``.pt``: A1111's ``{"string_to_token": {"*": 265}, "string_to_param": {"*": [N, D]}, "name",
  "step", "sd_checkpoint", "sd_checkpoint_name"}`` plus ``"reneg"``: the provenance strings;
- SD1.x/SD2.x ``.safetensors``: ``{"emb_params": [N, D]}`` with the provenance as metadata;
- SDXL ``.safetensors``: ``{"clip_l": [N, 768], "clip_g": [N, 1280]}`` with the provenance as metadata.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .families import FAMILIES, get_family

TOKEN_FORMAT = "reneg-tokens"
MAX_TOKENS = 75  # 77 positions less the start and end tokens
SD_KEY = "emb_params"  # the one tensor of an A1111 .safetensors TI file
SDXL_KEYS = ("clip_l", "clip_g")
PLACEHOLDER_ID = 0  # the id at the vectors' positions (A1111's): below the end token's, so pooling reads EOS


class TokenError(ValueError):
    """A negative-token file is unreadable or does not fit the model."""


def token_families() -> tuple[str, ...]:
    """Families whose negatives can be tokens: the CLIP-encoder families (their ``encoders`` widths)."""
    return tuple(f.name for f in FAMILIES.values() if f.encoders and not f.masked)


def encoder_keys(family: str) -> tuple[str, ...]:
    """The vector groups of a family: one (``emb_params``) for a single encoder, ``clip_l``/``clip_g``
    for SDXL."""
    spec = get_family(family)
    return SDXL_KEYS if len(spec.encoders) == 2 else (SD_KEY,)


def family_for_widths(widths: tuple[int, ...]) -> str | None:
    """The family whose text encoders' input widths these are (768 -> sd1, 1024 -> sd2, 768+1280 -> sdxl)."""
    for name in token_families():
        if FAMILIES[name].encoders == tuple(widths):
            return name
    return None


def _describe_widths(widths: tuple[int, ...]) -> str:
    fam = family_for_widths(widths)
    w = " + ".join(str(x) for x in widths)
    return f"{w}-wide ({FAMILIES[fam].description})" if fam else f"{w}-wide (no family we know)"


@dataclass
class TokenNegative:
    """N input-token vectors per text encoder: ``vectors[key]`` is ``[N, width]`` (keys from
    :func:`encoder_keys`)."""

    vectors: dict[str, torch.Tensor]
    family: str
    metadata: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    format: str = TOKEN_FORMAT
    name: str = ""

    @property
    def count(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    def flat(self) -> torch.Tensor:
        """``[N, sum of widths]``: the one tensor training optimises (SDXL: clip_l then clip_g)."""
        return torch.cat([self.vectors[k].float() for k in encoder_keys(self.family)], dim=-1)

    @staticmethod
    def from_flat(flat: torch.Tensor, family: str, **kw) -> "TokenNegative":
        widths = get_family(family).encoders
        parts = torch.split(flat.detach().float().cpu(), list(widths), dim=-1)
        return TokenNegative({k: p.contiguous() for k, p in zip(encoder_keys(family), parts)}, family, **kw)

    def info(self) -> dict[str, Any]:
        out = {
            "path": self.path,
            "format": self.format,
            "family": self.family,
            "kind": "tokens",
            "tokens": self.count,
            "name": self.name,
            "vectors": {k: list(v.shape) for k, v in self.vectors.items()},
            "dtype": str(next(iter(self.vectors.values())).dtype).replace("torch.", ""),
            "norms": {k: [round(float(x), 4) for x in v.double().norm(dim=-1)] for k, v in self.vectors.items()},
            "metadata": dict(sorted(self.metadata.items())),
        }
        return out


# --- files ------------------------------------------------------------------------------------------------


def provenance(family: str, count: int, **fields: Any) -> dict[str, str]:
    """The metadata strings a token file carries: what it is, for which family, how it was made."""
    spec = get_family(family)
    meta: dict[str, Any] = {
        "format": TOKEN_FORMAT,
        "family": family,
        "tokens": count,
        "text_encoder": spec.text_encoder,
        "convention": "negative prompt = the name alone: BOS, the vectors, EOS, padding to 77 as the tokenizer pads",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "reneg_version": __version__,
    }
    meta.update({k: v for k, v in fields.items() if v is not None})
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def check_vectors(tok: TokenNegative, path: str) -> None:
    keys = encoder_keys(tok.family)
    if set(tok.vectors) != set(keys):
        raise TokenError(f"{path}: a {tok.family} token file holds {', '.join(keys)}, found {', '.join(tok.vectors)}")
    widths = get_family(tok.family).encoders
    counts = set()
    for k, w in zip(keys, widths):
        v = tok.vectors[k]
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() != 2 or v.shape[1] != w:
            found = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise TokenError(f"{path}: {k} must be [tokens, {w}] float vectors for {tok.family}, found {found}")
        if not bool(torch.isfinite(v).all()):
            raise TokenError(f"{path}: {k} has NaN/inf values")
        counts.add(int(v.shape[0]))
    if len(counts) != 1:
        raise TokenError(f"{path}: {' and '.join(keys)} must hold the same number of vectors, found {sorted(counts)}")
    n = counts.pop()
    if not 1 <= n <= MAX_TOKENS:
        raise TokenError(f"{path}: expected 1 to {MAX_TOKENS} vectors (77 positions less start and end), found {n}")


def save_tokens(path: str | os.PathLike, tok: TokenNegative, overwrite: bool = False, step: int | None = None) -> str:
    """Write ``tok`` as a TI file the UIs read, atomically: ``.pt`` (A1111's ``string_to_param``; SD1.x/SD2.x)
    or ``.safetensors`` (``emb_params``, or SDXL's ``clip_l``/``clip_g``). The file's name is the name a
    prompt uses."""
    from .fileio import atomic_save_safetensors, atomic_torch_save

    path = str(path)
    check_vectors(tok, path)
    name = tok.name or Path(path).stem
    meta = dict(provenance(tok.family, tok.count), **tok.metadata)
    meta.update(format=TOKEN_FORMAT, family=tok.family, tokens=str(tok.count), name=name)
    if step is not None:
        meta["trained_steps"] = str(step)
    vectors = {k: v.detach().float().cpu().contiguous() for k, v in tok.vectors.items()}
    if path.endswith(".safetensors"):
        atomic_save_safetensors(path, vectors, metadata=meta, overwrite=overwrite)
    elif path.endswith(".pt"):
        if tok.family == "sdxl":
            raise TokenError(f"{path}: SDXL token files are written as .safetensors (clip_l and clip_g), not .pt")
        data = {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vectors[SD_KEY]},
            "name": name,
            "step": int(step or 0),
            "sd_checkpoint": meta.get("base_model_hash"),
            "sd_checkpoint_name": meta.get("base_model"),
            "reneg": meta,
        }
        atomic_torch_save(path, data, overwrite=overwrite)
    else:
        raise TokenError(f"{path}: token files are written as .safetensors or .pt")
    return path


def _family_of(path: str, vectors: dict[str, torch.Tensor], named: str | None) -> str:
    widths = tuple(int(v.shape[-1]) for v in vectors.values())
    fam = family_for_widths(widths)
    if named in FAMILIES and (fam is None or fam == named or FAMILIES[named].encoders == widths):
        fam = named if FAMILIES[named].encoders == widths else fam
    if fam is None:
        raise TokenError(
            f"{path}: token vectors of width {' + '.join(map(str, widths))} fit no family; expected "
            + ", ".join(f"{'+'.join(map(str, FAMILIES[f].encoders))} ({f})" for f in token_families())
        )
    return fam


def load_tokens(path: str | os.PathLike, expected_family: str | None = None) -> TokenNegative:
    """Read a textual-inversion file (ours or a third party's): A1111 ``.pt`` (``string_to_param``),
    ``.safetensors`` with ``emb_params`` or one tensor, SDXL ``clip_l`` + ``clip_g``, diffusers'
    ``{token: tensor}``. Pickles load with ``weights_only=True``. Any failure is one :class:`TokenError`
    naming the file; ``expected_family`` refuses a file made for another family."""
    path = str(path)
    try:
        tok = _load_tokens(path)
    except TokenError:
        raise
    except Exception as e:  # untrusted content: any other failure is still a bad file
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise TokenError(
            f"{path}: not a readable textual-inversion file ({type(e).__name__}{': ' + detail if detail else ''})"
        ) from None
    if expected_family and tok.family != expected_family:
        want = get_family(expected_family)
        raise TokenError(
            f"{path}: a {tok.family} textual-inversion file ({_describe_widths(get_family(tok.family).encoders)} "
            f"token vectors), but the model in use is {expected_family}, whose token vectors are "
            f"{_describe_widths(want.encoders)}"
        )
    return tok


def _load_tokens(path: str) -> TokenNegative:
    from .fileio import not_a_file, read_safetensors_header, safe_torch_load

    why = not_a_file(path)
    if why:
        raise TokenError(f"{path}: {why}")
    meta: dict[str, str] = {}
    name = Path(path).stem
    with open(path, "rb") as f:
        magic = f.read(9)
    size = os.path.getsize(path)
    is_st = len(magic) >= 9 and 0 < int.from_bytes(magic[:8], "little") <= size - 8 and magic[8:9] == b"{"
    if is_st:
        from safetensors.torch import load_file

        header = read_safetensors_header(path)
        meta = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
        data: Any = load_file(path, device="cpu")
        fmt = "safetensors"
    else:
        data = safe_torch_load(path, what="textual-inversion file")
        fmt = "pt"
    if isinstance(data, torch.Tensor):
        data = {name: data}
    if not isinstance(data, dict):
        raise TokenError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    if isinstance(data.get("reneg"), dict):
        meta = {str(k): str(v) for k, v in data["reneg"].items()}
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise TokenError(
                f"{path}: string_to_param must be a dict holding one tensor, found {type(params).__name__}"
            )
        vectors = {SD_KEY: next(iter(params.values()))}
        name = str(data.get("name") or name)
        fmt = "a1111-pt"
    elif all(k in data for k in SDXL_KEYS):
        vectors = {k: data[k] for k in SDXL_KEYS}
        fmt = f"{fmt}-sdxl"
    elif SD_KEY in data:
        vectors = {SD_KEY: data[SD_KEY]}
        fmt = f"{fmt}-emb_params"
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            keys = ", ".join(map(str, data))[:200]
            raise TokenError(
                f"{path}: expected string_to_param, emb_params, clip_l + clip_g or a single tensor; found keys {keys}"
            )
        key, t = next(iter(tensors.items()))
        vectors, fmt = {SD_KEY: t}, f"{fmt}-single"
        if fmt.startswith("pt") and key.startswith("<"):
            name = key.strip("<>")  # diffusers' learned_embeds.bin: {"<token>": tensor}
    for k, v in list(vectors.items()):
        if not isinstance(v, torch.Tensor):
            raise TokenError(f"{path}: {k} must be a tensor, found {type(v).__name__}")
        if v.dim() == 1:
            v = v.unsqueeze(0)
        if v.dim() == 3 and v.shape[0] == 1:
            v = v[0]
        if v.dim() != 2:
            raise TokenError(f"{path}: {k} must be [tokens, width] vectors, found shape {list(v.shape)}")
        vectors[k] = v
    if len(vectors) == 1:
        width = int(vectors[SD_KEY].shape[-1])
        if width == 2048 or (width in (768, 1280) and meta.get("family") == "sdxl"):
            raise TokenError(
                f"{path}: one {width}-wide tensor; an SDXL textual-inversion file holds clip_l [tokens, 768] "
                f"and clip_g [tokens, 1280]"
            )
    family = _family_of(path, vectors, meta.get("family"))
    tok = TokenNegative(vectors, family, meta, path, fmt, name)
    check_vectors(tok, path)
    return tok


def looks_like_tokens(path: str) -> bool:
    """Whether a file reads as a textual-inversion file (for ``reneg inspect``)."""
    try:
        _load_tokens(str(path))
        return True
    except Exception:  # noqa: BLE001 - a probe
        return False


# --- the encoder ---------------------------------------------------------------------------------------------


class TokenEncoder:
    """N input-token vectors through a backend's frozen text encoder(s) to the output-space negative its
    sampler uses: ``encode(flat)`` gives ``(rows [1, 77, D], pooled [1, P] or None)``, differentiable in
    ``flat`` (``[N, sum of widths]``, see :meth:`TokenNegative.flat`)."""

    def __init__(self, backend):
        fam = getattr(backend, "family", None)
        if fam not in token_families():
            raise TokenError(
                f"negative tokens need a CLIP text encoder ({', '.join(token_families())}); the model in use is {fam}"
            )
        if not hasattr(backend, "text_encoder") or not hasattr(backend, "tokenizer"):
            raise TokenError("negative tokens need a diffusers model (its text encoders and tokenizers)")
        self.backend = backend
        self.family = fam
        pairs = [(backend.tokenizer, backend.text_encoder)]
        if getattr(backend, "text_encoder_2", None) is not None:
            pairs.append((backend.tokenizer_2, backend.text_encoder_2))
        self.pairs = pairs
        self.widths = tuple(int(te.get_input_embeddings().weight.shape[1]) for _, te in pairs)
        if self.widths != get_family(fam).encoders:
            raise TokenError(f"text encoders of widths {self.widths} do not match family {fam}")
        self._empty_ids = [self._empty(tok) for tok, _ in pairs]
        # each encoder's token-table spread: training moves ``vectors / unit``, so the same --lr takes steps of
        # the same relative size as on an output-space embedding (whose values are ~1 where tokens are ~0.02)
        self.unit = torch.cat(
            [
                torch.full((w,), float(te.get_input_embeddings().weight.detach().float().std()))
                for w, (_, te) in zip(self.widths, pairs)
            ]
        )

    @staticmethod
    def _empty(tokenizer) -> list[int]:
        """The empty prompt's ids as the backend tokenizes it: start, end, then the tokenizer's padding."""
        return list(
            tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids[0]
        )

    def ids(self, n: int, which: int = 0) -> torch.Tensor:
        """``[1, 77]``: start token, ``n`` placeholders (id 0), end token, padding."""
        if not 1 <= n <= MAX_TOKENS:
            raise TokenError(f"--tokens {n}: expected 1 to {MAX_TOKENS} vectors (77 positions less start and end)")
        e = self._empty_ids[which]
        return torch.tensor([e[:1] + [PLACEHOLDER_ID] * n + e[1 : len(e) - n]])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        if flat.dim() != 2 or flat.shape[1] != sum(self.widths):
            raise TokenError(f"token vectors must be [N, {sum(self.widths)}], found {list(flat.shape)}")
        return list(torch.split(flat, list(self.widths), dim=-1))

    @contextlib.contextmanager
    def _spliced(self, te, vec: torch.Tensor):
        """Within: the encoder's token-embedding output has ``vec`` at positions 1..N (as A1111 and
        ComfyUI place TI vectors; diffusers gets the same rows from its added tokens)."""
        n = vec.shape[0]

        def hook(_mod, _inp, out):
            v = vec.to(device=out.device, dtype=out.dtype).unsqueeze(0).expand(out.shape[0], -1, -1)
            return torch.cat([out[:, :1], v, out[:, 1 + n :]], dim=1)

        handle = te.get_input_embeddings().register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def encode(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output-space negative of the vectors, read as the backend reads a prompt."""
        parts = self.split(flat)
        n = flat.shape[0]
        device = self.backend.device
        if len(self.pairs) == 1:
            _, te = self.pairs[0]
            with self._spliced(te, parts[0]):
                out = te(self.ids(n).to(device), return_dict=True)
            return out.last_hidden_state.float(), None
        rows = []
        for i, ((_, te), vec) in enumerate(zip(self.pairs, parts)):
            with self._spliced(te, vec):
                out = te(self.ids(n, i).to(device), output_hidden_states=True, return_dict=True)
            rows.append(out.hidden_states[-2].float())
        return torch.cat(rows, dim=-1), out.text_embeds.float().reshape(1, -1)

    def cond(self, flat: torch.Tensor):
        """The negative's Cond for the sampler (SDXL: its own pooled vector, as the UIs make it)."""
        rows, pooled = self.encode(flat)
        return self.backend.negative_cond(rows, pooled)

    # --- starting points ---

    def token_vectors(self, ids: list[int], which: int) -> torch.Tensor:
        _, te = self.pairs[which]
        w = te.get_input_embeddings().weight
        return w[torch.tensor(ids, device=w.device)].detach().float().cpu()

    def from_text(self, text: str, n: int) -> torch.Tensor:
        """``[n, sum of widths]``: the text's own token vectors (without start and end), cut to ``n`` or
        followed by the end token's vector. For a text of at most ``n`` tokens on an encoder that pads
        with its end token (SD1.x's CLIP-L), the vectors give exactly the text's conditioning."""
        self.ids(n)  # checks n
        parts = []
        for i, (tok, _) in enumerate(self.pairs):
            e = self._empty_ids[i]
            bos, eos = e[0], e[1]
            ids = [t for t in tok([text], truncation=True).input_ids[0] if t not in (bos, eos)][:n]
            ids += [eos] * (n - len(ids))
            parts.append(self.token_vectors(ids, i))
        return torch.cat(parts, dim=-1)

    def null(self, n: int) -> torch.Tensor:
        """The end token's vector ``n`` times: the empty prompt's conditioning exactly where the tokenizer
        pads with the end token (SD1.x); not in general where it pads with another token (OpenCLIP's 0)."""
        return self.from_text("", n)

    def text_token_count(self, text: str) -> int:
        tok = self.pairs[0][0]
        e = self._empty_ids[0]
        return len([t for t in tok([text], truncation=True).input_ids[0] if t not in (e[0], e[1])])


def fit_tokens(
    encoder: TokenEncoder,
    target: torch.Tensor,
    n: int,
    steps: int = 300,
    lr: float = 0.15,
    init: torch.Tensor | None = None,
    target_pooled: torch.Tensor | None = None,
    seed: int = 0,
    log=None,
) -> tuple[torch.Tensor, dict]:
    """N token vectors whose encoding matches ``target`` (``[1, 77, D]``, an output-space negative), by Adam
    on the mean squared error of the rows (and, SDXL, of the pooled vector when ``target_pooled`` is given),
    each row's error taken relative to the target's mean row norm; ``lr`` is in units of the token table's
    spread (:attr:`TokenEncoder.unit`). Returns the vectors and :func:`fit_report`."""
    torch.manual_seed(seed)
    start = init if init is not None else encoder.null(n)
    unit = encoder.unit.to(encoder.backend.device)
    u = torch.nn.Parameter((start.detach().float().to(unit.device) / unit).clone())
    target = target.detach().float().to(encoder.backend.device)
    scale = float(target[0].norm(dim=-1).mean()) ** 2 or 1.0
    tp = None if target_pooled is None else target_pooled.detach().float().reshape(1, -1).to(unit.device)
    pscale = None if tp is None else (float(tp.norm()) ** 2 or 1.0)
    opt = torch.optim.Adam([u], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    best, best_loss = start.detach().float().clone(), float("inf")
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        vec = u * unit
        rows, pooled = encoder.encode(vec)
        loss = ((rows - target) ** 2).sum(-1).mean() / scale
        if tp is not None and pooled is not None:
            loss = loss + ((pooled - tp) ** 2).sum() / pscale
        loss.backward()
        lv = float(loss.detach())
        if lv < best_loss:
            best, best_loss = vec.detach().clone(), lv
        opt.step()
        sched.step()
        if log is not None and (i % 50 == 0 or i == steps - 1):
            log(f"step {i + 1}/{steps}: relative squared error {lv:.5f}")
    with torch.no_grad():
        rows, pooled = encoder.encode(best)
    return best.cpu(), fit_report(rows.cpu(), target.cpu(), pooled, target_pooled)


def fit_report(rows: torch.Tensor, target: torch.Tensor, pooled=None, target_pooled=None) -> dict:
    """How close an encoding is to a target: per-row cosine and relative error (``|r - t| / |t|``) and the
    whole tensor's (Frobenius) relative error and cosine."""
    r, t = rows[0].double(), target[0].double()
    cos = torch.nn.functional.cosine_similarity(r, t, dim=-1)
    rel = (r - t).norm(dim=-1) / t.norm(dim=-1).clamp_min(1e-12)
    out = {
        "relative_error": float((r - t).norm() / t.norm().clamp_min(1e-12)),
        "cosine": float(torch.nn.functional.cosine_similarity(r.flatten(), t.flatten(), dim=0)),
        "row_cosine": [round(float(x), 5) for x in cos],
        "row_relative_error": [round(float(x), 5) for x in rel],
        "row_cosine_min": float(cos.min()),
        "row_cosine_mean": float(cos.mean()),
    }
    if pooled is not None and target_pooled is not None:
        p, q = pooled.double().flatten().cpu(), target_pooled.double().flatten().cpu()
        out["pooled_relative_error"] = float((p - q).norm() / q.norm().clamp_min(1e-12))
    return out


def convert_to_tokens(
    src: str,
    dst: str,
    backend,
    n: int,
    steps: int = 300,
    lr: float = 0.15,
    overwrite: bool = False,
    log=None,
) -> tuple[TokenNegative, dict]:
    """``reneg convert SRC DST --to tokens N --model M``: N token vectors fitted (:func:`fit_tokens`) to the
    output-space embedding in ``src`` through ``backend``'s text encoder(s), written to ``dst`` as a TI file.
    The report says how close the tokens' encoding came to the embedding, beside how far the empty prompt's
    is (the distance the embedding's training covered), and ``kept``: the share of that distance the
    tokens cover (1 - fit error / null error)."""
    import hashlib

    from .embedding import load_embedding

    enc = TokenEncoder(backend)
    enc.ids(n)  # 1..75, said before any work
    if os.path.exists(dst) and not overwrite:
        raise TokenError(f"{dst}: already exists (pass --overwrite to replace it)")
    if not str(dst).endswith((".safetensors", ".pt")) or (
        backend.family == "sdxl" and not dst.endswith(".safetensors")
    ):
        raise TokenError(
            f"{dst}: token files are written as .safetensors" + ("" if backend.family == "sdxl" else " or .pt")
        )
    emb = load_embedding(src, expected_family=backend.family)
    target = emb.model_rows().float()
    if tuple(target.shape[1:]) != (77, target.shape[-1]):
        raise TokenError(f"{src}: a {list(target.shape)} embedding; negative tokens give 77 rows")
    pooled = emb.pooled.float() if emb.pooled is not None and backend.family == "sdxl" else None
    # the baseline is the empty prompt's own encoding (what the embedding's training starts from), not the
    # end-token vectors training starts from: the two are equal only where the tokenizer pads with its end
    # token (SD1.x); OpenCLIP pads with 0 (SD2.x, SDXL's bigG), where they differ
    null_rows, null_pooled = backend.null_embedding()
    vec, report = fit_tokens(enc, target, n, steps=steps, lr=lr, target_pooled=pooled, log=log)
    null = fit_report(null_rows.detach().float().cpu(), target, null_pooled, pooled)
    report = dict(report, tokens=n, steps=steps, null_relative_error=null["relative_error"], null_cosine=null["cosine"])
    report["kept"] = 1.0 - report["relative_error"] / max(null["relative_error"], 1e-12)
    with open(src, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    meta = provenance(
        backend.family,
        n,
        how=f"reneg convert --to tokens {n}: fitted to an output-space embedding through the frozen text encoder",
        source=os.path.basename(src),
        source_sha256=digest,
        base_model=emb.metadata.get("base_model"),
        fit_relative_error=round(report["relative_error"], 6),
        fit_cosine=round(report["cosine"], 6),
        fit_kept=round(report["kept"], 6),
    )
    for k in ("rewards", "reward_files", "trained_steps", "seed"):
        if k in emb.metadata:
            meta[f"source_{k}"] = emb.metadata[k]
    tok = TokenNegative.from_flat(vec, backend.family, metadata=meta)
    save_tokens(dst, tok, overwrite=overwrite)
    return tok, report
