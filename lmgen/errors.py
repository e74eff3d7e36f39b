"""Exceptions lmgen raises for bad input.

Each one subclasses the built-in type callers already catch (``ValueError``,
``FileNotFoundError``) and :class:`LmgenError`, so front ends (CLI, server) can turn
every user mistake into one clear line without a traceback.
"""


class LmgenError(Exception):
    """Base class of every error caused by the caller's input or environment."""


class InvalidArgumentError(LmgenError, ValueError):
    """A parameter or prompt is out of range; the message names it and the fix."""


class ModelNotFoundError(LmgenError, FileNotFoundError):
    """A checkpoint folder, hub id or required file could not be found."""


class UnsupportedModelError(LmgenError, ValueError):
    """The checkpoint exists but lmgen cannot run it (architecture, format)."""


class InsufficientMemoryError(LmgenError, MemoryError):
    """The model would not fit the memory free on its device; the message names both sizes."""
