"""Adaptation: make a converted model good again (attention transfer, then
fine-tuning with distillation from the original softmax model), on one CPU or
many GPUs through Hugging Face Accelerate.  See ``docs/adaptation.md``."""

from .api import adapt
from .config import AdaptConfig, parse_count, parse_seconds

__all__ = ["adapt", "AdaptConfig", "parse_count", "parse_seconds"]
