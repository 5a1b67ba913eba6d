"""The one base class of every error a user can fix.

A bad spec, a bad data line, a missing model folder, a run that diverged: each is raised as a
subclass of :class:`UserError` whose message names the field path or file and line and says what to
change. The CLI prints such an error (one line per problem) and exits with code 2, never with a
traceback; anything else is a bug in Stratos and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can act on; its message has one line per problem."""

    exit_code = 2  # what the CLI exits with

    def lines(self) -> list[str]:
        """One line per problem, as the CLI prints them."""
        return [line for line in str(self).splitlines() if line.strip()] or [type(self).__name__]


class ModelError(UserError):
    """A model that cannot be found, read or built as asked: the message names the folder or file,
    or the config field."""


class TrainingError(UserError):
    """Training cannot go on: its loss or gradients became non-finite, or a checkpoint belongs to
    another configuration. The message says which checkpoint was kept and what to change."""
