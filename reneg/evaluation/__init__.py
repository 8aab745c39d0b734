"""``reneg eval``: generate with several negatives, score with several rewards, write a report.

- :mod:`.stats`: means with Student-t intervals, paired win rates with Wilson intervals (pure Python).
- :mod:`.run`: negatives, prompt items, resumable batched generation, scoring, ``scores.csv``.
- :mod:`.report`: ``summary.json``, plots (matplotlib), ``report.html``, ``report.md``.
- :mod:`.video`: AnimateDiff (SD1.5 UNet + a local motion adapter) as a video backend.
- :mod:`.cli`: the ``reneg eval`` sub-command.

Importing this package imports nothing heavy; models load inside :func:`.run.run_eval`.
"""
