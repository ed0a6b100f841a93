"""``import engine.nn.functional as F`` works as in PyTorch: exactly engine.functional's public API."""

from engine.functional import *  # noqa: F403
from engine.functional import __all__  # noqa: F401
