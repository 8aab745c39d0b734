"""ComfyUI nodes of the ReNeg pack: thin adapters over the core in ``reneg``.

Importing this package needs only torch (and ComfyUI's ``folder_paths``, which
the host has loaded); rewards, samplers and model code are imported when a node runs.
"""

from .common import register_folders
from .load_embedding import ReNegLoadEmbedding
from .nag import ReNegNAG
from .predicted_negative import ReNegPredictedNegative
from .reward import ReNegLoadRewardModel, ReNegRewardScore
from .save_embedding import ReNegSaveEmbedding
from .tune import ReNegPerSampleTune

register_folders()

# ids are stable: saved workflows refer to them
NODE_CLASS_MAPPINGS = {
    "ReNegLoadEmbedding": ReNegLoadEmbedding,
    "ReNegPerSampleTune": ReNegPerSampleTune,
    "ReNegRewardScore": ReNegRewardScore,
    "ReNegLoadRewardModel": ReNegLoadRewardModel,
    "ReNegSaveEmbedding": ReNegSaveEmbedding,
    "ReNegNAG": ReNegNAG,
    "ReNegPredictedNegative": ReNegPredictedNegative,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ReNegLoadEmbedding": "Load ReNeg Embedding",
    "ReNegPerSampleTune": "Per-Sample ReNeg Tune",
    "ReNegRewardScore": "Reward Score",
    "ReNegLoadRewardModel": "Load Reward Model",
    "ReNegSaveEmbedding": "Save ReNeg Embedding",
    "ReNegNAG": "ReNeg NAG",
    "ReNegPredictedNegative": "ReNeg Predicted Negative",
}
