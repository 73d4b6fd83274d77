"""distill orchestration: recipe schema, run directory, stage cache and manifests, CLI."""

__version__ = "0.1.0"
