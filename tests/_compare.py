"""Comparing batches and loaders against torch's DataLoader."""

from __future__ import annotations

import numpy as np
import torch


def assert_same(a, b, where: str = "batch") -> None:
    """Assert two (nested) batches are equal, including tensor dtypes, shapes and
    grad flags."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a!r} != {b!r}"
        assert a.requires_grad == b.requires_grad, f"{where}: requires_grad differs"
        assert torch.equal(a, b), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.strides == b.strides, f"{where}: {a!r} != {b!r}"
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {a.keys()} != {b.keys()}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_epochs(ours, theirs, epochs: int = 2) -> None:
    """Iterate both loaders ``epochs`` times and compare batch for batch."""
    for epoch in range(epochs):
        got, want = list(ours), list(theirs)
        assert len(got) == len(want), f"epoch {epoch}: {len(got)} batches, torch {len(want)}"
        for i, (x, y) in enumerate(zip(got, want)):
            assert_same(x, y, f"epoch {epoch} batch {i}")


def assert_like_torch_batch_by_batch(ours, theirs: list, epochs: int = 2) -> None:
    """Iterate ``ours`` ``epochs`` times, comparing each batch with torch's batches
    ``theirs`` as it arrives and letting it go before the next, so that the loader
    reuses its memory."""
    for epoch in range(epochs):
        count = 0
        for i, batch in enumerate(ours):
            assert_same(batch, theirs[i], f"epoch {epoch} batch {i}")
            count += 1
        assert count == len(theirs), f"epoch {epoch}: {count} batches, torch {len(theirs)}"
