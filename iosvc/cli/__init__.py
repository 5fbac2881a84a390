"""iosvc command-line interface (``iosvc --help``)."""

from iosvc.cli._app import app, main

__all__ = ["app", "main"]
