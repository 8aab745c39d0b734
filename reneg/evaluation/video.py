"""Video models for ``reneg eval --video``; the code lives in :mod:`reneg.backends.video`."""

from reneg.backends.video import (  # noqa: F401  (re-exported: this module's public names)
    ANIMATEDIFF_SCHEDULER,
    MotionDenoiser,
    TextToVideoBackend,
    VideoBackend,
    is_text_to_video_folder,
    load_animatediff,
    load_text_to_video,
)
