"""Helpers shared by the sampler tests."""

from __future__ import annotations

import warnings

import numpy as np
from hypothesis import settings

from poolloader.samplers import DynamicBatchSampler
from poolloader.samplers._base import SamplerBase
from poolloader.samplers._checks import LengthsLike

FEW = settings(max_examples=25, deadline=None)
Batches = list[list[int]]


def lognormal(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(mean=1.5, sigma=0.7, size=count)


def epoch(sampler: SamplerBase, number: int) -> Batches:
    sampler.set_epoch(number)
    return list(sampler)


def padded_ratio(lengths: np.ndarray, batches: Batches) -> float:
    padded = sum(len(b) * lengths[b].max() for b in batches)
    return float(padded / lengths.sum())


def dynamic(lengths: LengthsLike, **kwargs: object) -> DynamicBatchSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DynamicBatchSampler(lengths, **kwargs)  # type: ignore[arg-type]
