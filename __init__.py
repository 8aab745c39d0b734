"""ComfyUI entry point of ReNeg: put this repository in ``ComfyUI/custom_nodes/``.

ComfyUI imports this folder as a package by its path, so everything here is
imported relatively (the core is ``.reneg``; as an installed package it is the
absolute ``reneg`` the command line uses). Loading imports only torch and
safetensors; reward, sampler and model code is imported when a node runs.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Loaded as a lone file, not as a package: pytest does this with a checkout whose folder name is not
    # a Python identifier (``git clone ... comfyui-reneg``) when it sets up the folder as a test package.
    # No host loads a node pack this way; there is nothing to register.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web/js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
