"""Names in a shard directory tree: the one place they are made. Dependency-free, so numpy-free
code (train.schedule) can use them too."""


def split_dir_name(split: str, prep_size: int) -> str:
    """`train-160`, `val-320`: the directory of one split at one prep_size."""
    return f"{split}-{prep_size}"
