"""Run by AUTOMATIC1111 / Forge / reForge at start-up, before the UI loads.

The extension needs only torch and safetensors, both of which the hosts ship.
This installs safetensors if, against expectation, it is missing, and nothing
else: it never installs, upgrades or pins torch, transformers or gradio.
"""

import launch

if not launch.is_installed("safetensors"):
    launch.run_pip("install safetensors", "safetensors for ReNeg")
