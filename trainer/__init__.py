"""ReNeg's headless trainer (installed as ``reneg.trainer``): ``reneg train`` and ``reneg tune``."""
