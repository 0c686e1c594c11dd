"""tfrs-coldstart: cold-start retrieval on TensorFlow Recommenders.

TFRS 0.7.7 needs Keras 2, so ``TF_USE_LEGACY_KERAS`` is set here, before
anything imports TensorFlow.

Example::

    import tfrs_coldstart
    model = tfrs_coldstart.load_model("runs/synthetic", "student")
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ start-up lines (oneDNN notices; on a machine without an NVIDIA driver a
# "failed call to cuInit" at error level) are noise to a user; Python errors are unaffected.
# Set TF_CPP_MIN_LOG_LEVEL yourself to see them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL",
                      "2" if os.path.exists("/proc/driver/nvidia") else "3")

__version__ = "0.1.0"

__all__ = ["load_model", "__version__"]


def __getattr__(name: str):  # lazy: importing the package must not import TensorFlow yet
    if name == "load_model":
        from tfrs_coldstart.runs import load_model

        return load_model
    raise AttributeError(f"module 'tfrs_coldstart' has no attribute {name!r}")
