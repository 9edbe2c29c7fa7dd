"""The instrumented inference process of llm-vigil."""

__version__ = "0.1.0"
