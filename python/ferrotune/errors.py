"""Exceptions raised by ferrotune, native code included (`rust/src/error.rs` maps onto these)."""

from __future__ import annotations


class FerrotuneError(Exception):
    """Base class of every ferrotune error."""


class FormatError(FerrotuneError, ValueError):
    """A file or input is malformed. `path` names the file, `place` the spot in it (a byte
    offset, a line, a field), `detail` what is wrong there."""

    def __init__(
        self, message: str, path: str | None = None, place: str | None = None, detail: str | None = None
    ):
        super().__init__(message)
        self.path = path
        self.place = place
        self.detail = detail


class ConfigError(FerrotuneError, ValueError):
    """A configuration key is unknown, mistyped or out of range; the message names the key."""


class NativePanic(FerrotuneError, RuntimeError):
    """A bug in native code: a Rust panic, caught at the boundary instead of aborting."""


class Cancelled(FerrotuneError):
    """Native work was interrupted before it finished; nothing half-written was left behind."""
