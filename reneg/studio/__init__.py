"""ReNeg Studio: a local web app (gradio) to train, watch, tune and compare negative embeddings.

``reneg studio`` starts it. Training and evaluation run as their own processes (``python -m
reneg.cli train|eval``), so a crash of a run never takes the app down and closing the browser
never stops one: a run's whole state lives in its output folder (``log.csv``, ``checkpoint.pt``,
``samples/``, ``summary.json``, ``studio_run.json``), where a reopened page finds it again.

A front-end: the core never imports it. :mod:`reneg.studio.forms` builds the forms from the
commands' own option definitions and checks them with the commands' checks; :mod:`reneg.studio.runs`
starts runs and reads their folders; one module per tab (:mod:`.train_tab`, :mod:`.tune_tab`,
:mod:`.compare_tab`, :mod:`.embeddings_tab`) holds its handlers and layout, and :mod:`.app` assembles
them. gradio is imported only when the page is built (:func:`reneg.studio.app.build_app`).
"""

from __future__ import annotations
