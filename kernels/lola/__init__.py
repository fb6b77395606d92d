"""LoLA attention: public functions. The PyTorch reference (``reference.py``) is the specification and
the CPU path; fast kernels are dispatched here when they exist for the device."""

from lola_chat.kernels.lola.reference import (
    accumulator,
    attend,
    evict,
    frame,
    hedgehog,
    rotate,
    self_recall_error,
)

__all__ = ["accumulator", "attend", "evict", "frame", "hedgehog", "rotate", "self_recall_error"]
