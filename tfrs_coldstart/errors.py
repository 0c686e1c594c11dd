"""The project's error base: every error a user can fix derives from :class:`UserError`.

The CLI catches ``UserError`` (and the OS's file errors) once, prints one line and exits 2;
anything else is a bug and keeps its traceback. ``TFRS_COLDSTART_DEBUG=1`` shows the
traceback of a ``UserError`` too.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a bad setting or a missing prerequisite; the message says what to do."""


class ConfigError(UserError, ValueError):
    """A config file, override or setting is wrong; the message names the key and why."""


class RunError(UserError, ValueError):
    """A run folder is missing or does not hold what is asked for."""
