"""A1111 / Forge "Install from URL" entry point.

The webui clones the whole repository into ``extensions/`` and loads ``scripts/*.py`` from
its top, so this file runs the real script, ``a1111_extension/scripts/reneg_negative.py``,
in this module's namespace. Nothing else lives here.
"""

import os as _os
import runpy as _runpy

_REAL = _os.path.join(
    _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "a1111_extension", "scripts", "reneg_negative.py"
)
globals().update({k: v for k, v in _runpy.run_path(_REAL, run_name=__name__).items() if not k.startswith("__")})
