"""A package whose submodule ``draws`` draws the system's randomness when imported,
as some libraries' submodules do (tests/test_template_own_state.py)."""
