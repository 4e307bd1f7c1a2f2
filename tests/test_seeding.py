"""Per-batch seeding leaves each generator exactly as seeding it by the definition
does: ``random`` and torch with the digest's low 63 bits, NumPy with its four words
(NOTE [ Seeding NumPy through CPython's twister ] in ``_seeding.py``)."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch

from poolloader._seeding import (
    _NUMPY,
    _PYTHON,
    SEED_MASK,
    _same_numpy_state,
    batch_digest,
    generator_states,
    own_random_state,
    seed_batch,
)


def _seed_by_definition(base_seed: int, epoch: int, position: int) -> None:
    words = np.frombuffer(batch_digest(base_seed, epoch, position), dtype=np.uint32)
    seed64 = (int(words[0]) | (int(words[1]) << 32)) & SEED_MASK
    random.seed(seed64)
    torch.default_generator.manual_seed(seed64)
    np.random.seed(words)


def _assert_same(a, b) -> None:
    assert a[0] == b[0]
    assert _same_numpy_state(a[1], b[1])
    assert torch.equal(a[2], b[2])


@pytest.mark.parametrize("cached_deviate", [False, True])
def test_a_batch_is_seeded_as_the_definition_says(cached_deviate):
    with own_random_state():
        for position in range(200):
            key = (12345 + position % 3, position % 5, position)
            if cached_deviate:
                np.random.standard_normal()  # one normal deviate left in the generator
            seed_batch(*key)
            seeded = generator_states()
            drawn = np.random.rand(4), random.random(), torch.rand(3)
            _seed_by_definition(*key)
            _assert_same(seeded, generator_states())
            assert np.array_equal(drawn[0], np.random.rand(4))
            assert drawn[1] == random.random()
            assert torch.equal(drawn[2], torch.rand(3))


def test_numpy_words_whose_top_word_is_zero_are_seeded_as_numpy_does():
    """Python keys its twister with fewer words then, so NumPy seeds itself."""
    with own_random_state():
        for digest in (bytes(range(1, 13)) + bytes(4), bytes(16), b"\xff" * 12 + bytes(4)):
            np.random.standard_normal()
            _NUMPY.seed(digest)
            seeded = np.random.get_state()
            np.random.seed(np.frombuffer(digest, dtype=np.uint32))
            assert _same_numpy_state(seeded, np.random.get_state())


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="CPython's twister")
def test_numpy_is_seeded_through_cpythons_twister():
    """The fast path is found and agrees with NumPy (else every batch pays
    ``np.random.seed``'s checks again, 21-25 µs)."""
    with own_random_state():
        seed_batch(1, 2, 3)
    assert _NUMPY._twister_words > 0


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="CPython's twister")
def test_randoms_state_is_saved_by_copying_its_words():
    """NOTE [ Saving random's state ]: the words are found (else every seeded batch
    of a num_workers=0 loader pays getstate and setstate again, 20-24 µs)."""
    with own_random_state():
        pass
    assert _PYTHON._words > 0
