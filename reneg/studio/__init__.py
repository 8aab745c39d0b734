"""ReNeg Studio: a local web app (gradio) to train, watch, tune and compare negative embeddings.

``reneg studio`` starts it. Training and evaluation run as their own processes (``python -m
reneg.cli train|eval``), so a crash of a run never takes the app down and closing the browser
never stops one: a run's whole state lives in its output folder (``log.csv``, ``checkpoint.pt``,
``samples/``, ``summary.json``, ``studio_run.json``), where a reopened page finds it again.

A front-end: the core never imports it. :mod:`reneg.studio.runs` needs only the standard library
and the trainer's config; gradio is imported by :mod:`reneg.studio.app` alone.
"""

from __future__ import annotations
