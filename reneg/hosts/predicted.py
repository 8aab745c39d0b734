"""A negative predictor in a web UI's CFG hook: each prompt's own negative from its conditioning.

A predictor file (``reneg train --predictor``, :mod:`reneg.predictor`) is listed and picked like an
embedding. :class:`PredictedNegative` stands where a :class:`reneg.embedding.NegEmbedding` stands in
:mod:`reneg.hosts.a1111` (``family``, ``tensor`` and ``pooled`` are its global negative's, ``metadata``,
``path``, ``dtype_problem``), and :meth:`PredictedNegative.predict` turns the host's positive
conditioning at a sampling step into the negative rows (and SDXL's pooled vector) for each image.

Imports only torch (and safetensors, through :mod:`reneg.predictor`).
"""

from __future__ import annotations

import copy
import threading

import torch

from ..predictor import NegPredictor
from ..uncond import crossattn_of, split_marker


class PredictedNegative:
    """A loaded predictor as the extension uses it."""

    is_predictor = True

    def __init__(self, model: NegPredictor):
        self.model = model
        self.global_embedding = model.global_embedding()
        self.family = model.spec.family
        self.tensor = self.global_embedding.tensor  # the rows' count and width: the global negative's
        self.pooled = self.global_embedding.pooled
        self.metadata = dict(getattr(model, "metadata", {}) or {})
        self.path = getattr(model, "path", None)
        self.global_embedding.path = self.path
        self.format = "reneg-predictor"
        self._lock = threading.Lock()
        self._on: dict = {}  # device -> the predictor there (the one read from the file stays on the CPU)

    def dtype_problem(self, dtype: torch.dtype) -> str | None:
        """Why the global negative overflows ``dtype``; a predicted negative is checked as it is made."""
        return self.global_embedding.dtype_problem(dtype)

    def _model_on(self, device: torch.device) -> NegPredictor:
        if device.type == "cpu":
            return self.model
        with self._lock:
            m = self._on.get(device)
            if m is None:
                m = self._on[device] = copy.deepcopy(self.model).to(device)
            return m

    @torch.no_grad()
    def predict(self, text_cond, batch: int) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
        """``(rows [B or 1, R, D], pooled [B or 1, P] or None, note)`` for a host's positive conditioning
        ``text_cond`` (a tensor ``[N, L, D]`` or an SDXL dict whose ``vector`` starts with the pooled text
        vector) and a negative of ``batch`` images. ``N == batch`` gives each image the negative of its
        own prompt, ``N == 1`` one for all; any other ``N`` (A1111's ``AND`` prompts put each sub-prompt
        in a row of its own) gives the mean of the rows' negatives, with a note. Raises ValueError when
        the conditioning is not the predictor's (a clear message)."""
        t = crossattn_of(text_cond)
        spec = self.model.spec
        if t is None or t.dim() != 3 or t.shape[-1] != spec.hidden:
            found = list(t.shape) if isinstance(t, torch.Tensor) else type(text_cond).__name__
            raise ValueError(
                f"{self.path}: a {self.family} predictor reads positive conditioning [B, tokens, {spec.hidden}], "
                f"found {found}"
            )
        _, rows = split_marker(t, self.tensor.shape[1])  # a ControlNet marker row is not the prompt's
        pooled = None
        if spec.pooled:
            vector = text_cond.get("vector") if isinstance(text_cond, dict) else None
            if not isinstance(vector, torch.Tensor) or vector.dim() != 2 or vector.shape[1] < spec.pooled:
                raise ValueError(
                    f"{self.path}: a {self.family} predictor reads the prompt's pooled vector (the first "
                    f"{spec.pooled} numbers of the conditioning's 'vector'); the host gave none"
                )
            pooled = vector[:, : spec.pooled]
        model = self._model_on(rows.device)
        neg, neg_pooled = model(rows.float(), None if pooled is None else pooled.float(), None)
        note = None
        n = neg.shape[0]
        if n not in (1, batch):
            note = (
                f"ReNeg: the positive conditioning has {n} prompts for {batch} images (AND prompts): "
                f"their predicted negatives are averaged"
            )
            neg = neg.mean(0, keepdim=True)
            neg_pooled = neg_pooled.mean(0, keepdim=True) if neg_pooled is not None else None
        if not bool(torch.isfinite(neg).all()) or (
            neg_pooled is not None and not bool(torch.isfinite(neg_pooled).all())
        ):
            raise ValueError(f"{self.path}: the predicted negative has NaN/inf values for this prompt")
        return neg, neg_pooled, note
