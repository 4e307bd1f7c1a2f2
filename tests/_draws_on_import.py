"""A module that draws the system's randomness and opens a file when imported, as
some libraries do; its dataset is unpickled (so the module imported) in the
template process first (tests/test_template_own_state.py)."""

from __future__ import annotations

import os

import numpy as np
from torch.utils.data import Dataset

GENERATOR = np.random.default_rng()
DEVNULL_AS_FILE = open(os.devnull, "rb")  # noqa: SIM115 (the module's life)
LOG = open(__file__, "rb")  # noqa: SIM115 (a regular file: an offset workers would share)


class FromThisModule(Dataset):
    """Item i is i."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        return i
