"""Errors a reader or writer raises for bad datasets; CLIs turn them into one stderr line."""


class DatasetError(Exception):
    """A dataset directory is missing, incomplete, corrupt or of an unknown version."""
