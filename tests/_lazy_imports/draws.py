"""Draws the system's randomness when imported."""

from __future__ import annotations

import numpy as np

GENERATOR = np.random.default_rng()
