"""The package version, in a module of its own: run folders and exports record it, and importing it must not
import the whole package (``resfit/__init__`` pulls in training and inference)."""

__version__ = "0.1.0"
