"""Scipion viewers of habinit (imported here to be discovered)."""

from .viewer_homo_abinit import HabinitHomoAbinitViewer

__all__ = ["HabinitHomoAbinitViewer"]
