"""Disk to device, usable alone: `from train.data import TrainLoader, ValLoader`.

Read top-down: samplers (which records, which crops) -> crops (box maths) -> decode (+ native/ C)
-> batches (uint8 NHWC) -> threads + ring (or worker processes) -> loaders -> prefetch (to the
device). Imports nothing of the trainer; contract.py states what a loader promises.
"""

__all__ = ["TrainLoader", "ValLoader"]


def __getattr__(name: str):
    # Lazy: crops and samplers are pure, and the dry run imports them without paying for torch.
    if name in __all__:
        from train.data import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module 'train.data' has no attribute {name!r}")
