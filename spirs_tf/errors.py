"""Exceptions that spirs-tf shows to users.

Every problem with user input (files, manifests, configs, command-line values) is raised as
:class:`SpirsInputError` with a one-line message that names the file and the problem. The CLI turns
it into ``spirs: error: <message>`` and exit code 2, never a traceback.
"""
from __future__ import annotations

import os


class SpirsInputError(ValueError):
    """Bad user input: the message names the offending file (if any) and what is wrong with it."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = message
        super().__init__(f"{self.path}: {message}" if self.path else message)
