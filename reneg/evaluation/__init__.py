"""``reneg eval``: generate with several negatives, score with several rewards, write a report.

One module a step: the settings and items (:mod:`.config`), the negatives, the image files, the
manifest that keeps a resumed run safe, the run itself (:mod:`.run`), scoring (``scores.csv``,
``diversity.csv``), provenance (rewards trained on / held out), statistics and the report;
:mod:`.video` re-exports :mod:`reneg.backends.video` and :mod:`.cli` is the sub-command.
Importing this package imports nothing heavy; models load inside :func:`.run.run_eval`.
"""
