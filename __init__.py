"""ComfyUI entry point of ReNeg: put this repository in ``ComfyUI/custom_nodes/``.

ComfyUI imports this folder as a package by its path, so everything here is
imported relatively (the core is ``.reneg``; as an installed package it is the
absolute ``reneg`` the command line uses). Loading imports only torch and
safetensors; reward, sampler and model code is imported when a node runs.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web/js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
