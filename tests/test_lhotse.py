"""Whole-batch sampling, lhotse style: the sampler yields a CutSet, the dataset builds the batch."""

from __future__ import annotations

import warnings

import torch
from _compare import assert_same_epochs
from lhotse import CutSet
from lhotse.dataset import DynamicBucketingSampler
from lhotse.testing.dummies import DummyManifest

from poolloader import DataLoader


class CutBatches(torch.utils.data.Dataset):
    """Builds a batch from a CutSet in the worker, as lhotse's K2SpeechRecognitionDataset does."""

    def __getitem__(self, cuts: CutSet):
        cuts = cuts.sort_by_duration(ascending=False)
        return {
            "ids": [cut.id for cut in cuts],
            "duration": torch.tensor([cut.duration for cut in cuts]),
            "worker": torch.utils.data.get_worker_info() is not None,
        }


def _sampler() -> DynamicBucketingSampler:
    cuts = DummyManifest(CutSet, begin_id=0, end_id=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DynamicBucketingSampler(cuts, max_duration=7, num_buckets=2, shuffle=True, seed=3)


def test_dynamic_bucketing_sampler_through_the_pool():
    all_ids = sorted(c.id for c in DummyManifest(CutSet, begin_id=0, end_id=60))
    with DataLoader(CutBatches(), sampler=_sampler(), batch_size=None, num_workers=2,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        batches = list(loader)
    assert len(batches) > 1 and all(b["worker"] for b in batches)
    assert sorted(i for b in batches for i in b["ids"]) == all_ids
    assert all(b["duration"].sum() <= 7 for b in batches)


def test_same_batches_as_torch():
    ours = DataLoader(CutBatches(), sampler=_sampler(), batch_size=None, num_workers=2,
                      multiprocessing_context="forkserver", collate_fn=_no_worker_flag)  # fmt: skip
    theirs = torch.utils.data.DataLoader(
        CutBatches(), sampler=_sampler(), batch_size=None, collate_fn=_no_worker_flag
    )
    with ours:
        assert_same_epochs(ours, theirs, epochs=2)


def _no_worker_flag(batch):
    batch = dict(batch)
    del batch["worker"]
    return batch


def test_resume_with_a_lhotse_sampler_counts_only_yielded_batches():
    # lhotse's own loader over-counted prefetched batches on resume; the state
    # here is the sampler's as of the last batch yielded, not as of the last drawn.
    def ids(loader):
        return [tuple(b["ids"]) for b in loader]

    with DataLoader(CutBatches(), sampler=_sampler(), batch_size=None, num_workers=2,
                    collate_fn=_no_worker_flag, multiprocessing_context="forkserver") as loader:  # fmt: skip
        reference = ids(loader)
    with DataLoader(CutBatches(), sampler=_sampler(), batch_size=None, num_workers=2,
                    collate_fn=_no_worker_flag, multiprocessing_context="forkserver") as loader:  # fmt: skip
        iterator = iter(loader)
        before = [tuple(next(iterator)["ids"]) for _ in range(3)]
        state = loader.state_dict()
    assert state["in_epoch"]["sampler"] is not None
    with DataLoader(CutBatches(), sampler=_sampler(), batch_size=None, num_workers=2,
                    collate_fn=_no_worker_flag, multiprocessing_context="forkserver") as loader:  # fmt: skip
        loader.load_state_dict(state)
        after = ids(loader)
    assert before + after == reference
