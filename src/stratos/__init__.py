"""Stratos: distil large language models into small, fast, task-specific ones."""

__version__ = "0.1.0"
