"""The package version (read by the CLI's fast ``--version`` path; pyproject reads it too)."""

__version__ = "0.1.0"
