"""tfrs-coldstart: cold-start retrieval on TensorFlow Recommenders.

TFRS 0.7.7 needs Keras 2, so ``TF_USE_LEGACY_KERAS`` is set here, before
anything imports TensorFlow.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
