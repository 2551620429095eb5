"""Errors meant for people: each carries one sentence saying what is wrong and what to do.

Entrypoints catch `DistillError` and print its message alone, without a traceback from a worker.
"""


class DistillError(Exception):
    """Base of every user-facing error in ray-distill."""


class ConfigError(DistillError):
    """The configuration is wrong; raised before any work starts."""


class LabelsError(DistillError):
    """Labels are missing, corrupt, or do not match what a stage expects."""


class ModelError(DistillError):
    """A model or tokenizer is missing or unusable."""


class StorageError(DistillError):
    """The run root's storage cannot be read or written."""
