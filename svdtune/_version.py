"""The svdtune version, in a module of its own so that ``svdtune --version`` needs no torch import.

Keep it equal to ``version`` in pyproject.toml (tests/test_cli.py checks).
"""

__version__ = "0.1.0"
