"""Video models for ``reneg eval --video``; the code lives in :mod:`reneg.backends.video`."""

from reneg.backends.video import (ANIMATEDIFF_SCHEDULER, MotionDenoiser, TextToVideoBackend, VideoBackend,  # noqa: F401
                                  is_text_to_video_folder, load_animatediff, load_text_to_video)
