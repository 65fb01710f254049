"""The archbench version (part of every organism's and result's identity)."""

__version__ = "0.1.0"
