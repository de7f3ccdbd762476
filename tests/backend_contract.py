"""Moved into the package: ``cl_tokens.testing.backend_contract``.

Kept as a re-export so ``from backend_contract import BackendContract`` still works;
new cases belong in ``cl_tokens/testing/backend_contract.py``.
"""

from cl_tokens.testing.backend_contract import BackendContract, make_token

__all__ = ["BackendContract", "make_token"]
