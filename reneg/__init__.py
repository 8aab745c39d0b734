"""ReNeg: learned negative embeddings for classifier-free guidance.

The core package. Importing it (and :mod:`reneg.embedding`, :mod:`reneg.fileio`,
:mod:`reneg.families`) needs only torch and safetensors; everything that needs
diffusers, transformers or open_clip imports them inside the function that uses them.

``reneg.load_negative(pipe, path, prompt)`` gives a diffusers pipeline the keyword arguments of a
ReNeg file (:mod:`reneg.diffusers_api`, imported on first use).
"""

__version__ = "0.1.0"


def __getattr__(name):  # PEP 562: `import reneg` stays as light as it was
    if name == "load_negative":
        from .diffusers_api import load_negative

        return load_negative
    raise AttributeError(f"module 'reneg' has no attribute {name!r}")
