"""Typed errors. Library code raises these; the CLI turns them into one readable line and an exit code."""

from __future__ import annotations


class LaserBatchError(Exception):
    """Base class of every error laser-batch raises on purpose."""

    exit_code = 2


class InputError(LaserBatchError):
    """A file, column or value given by the user is missing or malformed."""


class ConfigError(LaserBatchError):
    """An unknown config key or an invalid config value."""


class CheckpointError(LaserBatchError):
    """A run directory or checkpoint is missing, incomplete or of another format version."""


class ArtifactError(LaserBatchError):
    """An export directory is missing, incomplete, tampered with, or cannot be loaded or validated."""


class EngineError(LaserBatchError):
    """The distributed engine is not installed or not reachable, or a job on it failed."""
