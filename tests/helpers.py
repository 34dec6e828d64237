"""Importable test helpers (conftest fixtures are not importable by name)."""
from conftest import assert_close, to_numpy, torch_state_to_mx  # noqa: F401
