"""The version of zmon (one place; zmon.__version__ re-exports it)."""

__version__ = "0.1.0"  # pyproject.toml reads it (setuptools dynamic version)
