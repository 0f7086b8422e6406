"""The package's version: the one source (pyproject.toml reads it, `flannel-repro --version` prints it)."""

__version__ = "0.1.0"
