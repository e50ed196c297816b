"""Scipion protocols of habinit (every protocol class must be imported here to be discovered)."""

from .protocol_homo_abinit import ProtHabinitHomoAbinitRefine

__all__ = ["ProtHabinitHomoAbinitRefine"]
