"""Seeding the random generators of dataset code.

Two policies (the loader's ``seeding`` option):

``"batch"`` (default)
    Before each batch is loaded, Python's ``random``, NumPy's global generator
    and torch's default generator are seeded from ``(base_seed, epoch,
    position)``. A batch's random augmentations then depend neither on which
    worker loaded it nor on how many workers there are, and a resumed run
    continues exactly.

``"worker"``
    torch's policy: each worker is seeded once with ``base_seed + worker_id``
    when it starts (and again each epoch when workers are not persistent);
    batches draw from the worker's stream in whatever order the worker gets them.
"""

from __future__ import annotations

import random

import numpy as np
import torch

SEEDING_POLICIES = ("batch", "worker")
_MASK32 = 0xFFFFFFFF


def batch_seed_state(base_seed: int, epoch: int, position: int) -> np.ndarray:
    """Four well-mixed 32-bit words for one batch (NumPy's SeedSequence hashing)."""
    entropy = [base_seed & _MASK32, (base_seed >> 32) & _MASK32, epoch, position]
    return np.random.SeedSequence(entropy).generate_state(4)


def seed_batch(base_seed: int, epoch: int, position: int) -> None:
    """Seed ``random``, NumPy and torch for batch ``position`` of ``epoch``."""
    state = batch_seed_state(base_seed, epoch, position)
    seed64 = int(state[0]) | (int(state[1]) << 32)
    random.seed(seed64)
    # The CPU generator only: torch.manual_seed also seeds every accelerator's
    # generators, which costs ~0.2 ms, too much to pay for every batch.
    torch.default_generator.manual_seed(seed64)
    np.random.seed(state)


def seed_worker(base_seed: int, worker_id: int) -> int:
    """torch's per-worker seeding; returns the worker's seed (``WorkerInfo.seed``)."""
    from torch.utils.data._utils.worker import _generate_state

    seed = base_seed + worker_id
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(_generate_state(base_seed, worker_id))
    return seed
