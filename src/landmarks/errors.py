"""Typed errors. The CLI prints a ``LandmarksError`` as one line and exits with status 2."""

from __future__ import annotations

from pathlib import Path


class LandmarksError(Exception):
    """Base class of the errors a user can cause (bad input, bad files, mismatched artefacts)."""


class ConfigError(LandmarksError, ValueError):
    """A configuration is invalid: unknown key, wrong type, unknown preset."""


class ImageDecodeError(LandmarksError):
    """An image could not be decoded. ``source`` names the file (or the upload), ``reason`` says why."""

    def __init__(self, source: str | Path, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class ImageTooLargeError(ImageDecodeError):
    """The image has more pixels than allowed (decompression bomb guard)."""


class IncompatibleArtifactError(LandmarksError):
    """An index, checkpoint or feature file does not match the model or version it is used with."""


class DataFormatError(LandmarksError, ValueError):
    """A CSV or list file is malformed; the message names the file and line."""
