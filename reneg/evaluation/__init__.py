"""``reneg eval``: generate with several negatives, score with several rewards, write a report.

- :mod:`.stats`: means with Student-t intervals, paired win rates with Wilson intervals (pure Python).
- :mod:`.config`: :class:`~.config.EvalConfig`, its numeric checks, the items (prompt, seed) an eval makes.
- :mod:`.negatives`: ``--negative [NAME=]SPEC`` parsed into :class:`~.negatives.Negative`.
- :mod:`.images`: the PNG (animated PNG for videos) files under ``OUT/images``.
- :mod:`.manifest`: ``manifest.json``, so a resumed run never mixes images made under other settings.
- :mod:`.run`: checking every flag, then resumable batched generation (per-sample tuning for tuned negatives).
- :mod:`.scoring`: scoring the image files with every reward, ``scores.csv``; in the same pass the image
  features each negative's diversity per prompt is measured in, ``diversity.csv``.
- :mod:`.provenance`: each reward marked trained on / held out from the evaluated embeddings' metadata.
- :mod:`.report`: ``summary.json``, plots (matplotlib), ``report.html``, ``report.md``.
- :mod:`.video`: AnimateDiff (SD1.5 UNet + a local motion adapter) as a video backend.
- :mod:`.cli`: the ``reneg eval`` sub-command.

Importing this package imports nothing heavy; models load inside :func:`.run.run_eval`.
"""
