"""The errors the core raises for the user: each message says what happened and how to fix it."""

from __future__ import annotations

from typing import Any


class TrainingError(RuntimeError):
    """A user-facing training failure (bad settings, a diverged loss, an unusable model)."""


class SettingError(TrainingError, ValueError):
    """A setting with an invalid value. `name` is the setting (node input) name; a frontend shows
    its own label for it instead (dstrain: the flag) through `labelled`."""

    def __init__(self, name: str, value: Any, fix: str):
        self.name, self.value, self.fix = name, value, fix
        super().__init__(f"{name}={value!r} is invalid: {fix}")

    def labelled(self, label: str) -> str:
        """The message with `label` (e.g. '--lr') in place of the setting's name."""
        return f"{label}={self.value!r} is invalid: {self.fix}"


class Cancelled(Exception):
    """Raised by a frontend's progress callback when the user stops training (ComfyUI's Cancel is
    translated by the node; Ctrl-C by dstrain). The run keeps finished work before re-raising the
    frontend's own exception."""
