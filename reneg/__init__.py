"""ReNeg: learned negative embeddings for classifier-free guidance.

The core package. Importing it (and :mod:`reneg.embedding`, :mod:`reneg.fileio`,
:mod:`reneg.families`) needs only torch and safetensors; everything that needs
diffusers, transformers or open_clip imports them inside the function that uses them.
"""

__version__ = "0.1.0"
