"""The command line."""

from allinone.cli.main import main

__all__ = ["main"]
