"""poolloader inside what people train with: torch's dataset helpers and Lightning."""

from __future__ import annotations

import gc
import time

import pytest
import torch
from _compare import assert_same_epochs
from _datasets import Plain, Squares
from torch.utils.data import ConcatDataset, DistributedSampler, Subset, random_split

from poolloader import DataLoader


def _pair(dataset_factory, **kwargs):
    ours = DataLoader(
        dataset_factory(), num_workers=2, multiprocessing_context="forkserver", **kwargs
    )
    theirs = torch.utils.data.DataLoader(dataset_factory(), **kwargs)
    return ours, theirs


@pytest.mark.parametrize(
    "factory",
    [
        lambda: Subset(Squares(), [3, 1, 4, 1, 5, 9, 2, 6]),
        lambda: ConcatDataset([Squares(5), Squares(7)]),
        lambda: random_split(Squares(), [0.5, 0.5], generator=torch.Generator().manual_seed(0))[1],
    ],
    ids=["Subset", "ConcatDataset", "random_split"],
)
def test_torch_dataset_helpers(factory):
    ours, theirs = _pair(factory, batch_size=3)
    with ours:
        assert_same_epochs(ours, theirs)


def test_distributed_sampler_shards_like_torch():
    for rank in range(2):

        def make():
            return DistributedSampler(Plain(21), num_replicas=2, rank=rank, shuffle=True, seed=4)

        ours = DataLoader(Plain(21), batch_size=4, sampler=make(), num_workers=2,
                          multiprocessing_context="forkserver")  # fmt: skip
        theirs = torch.utils.data.DataLoader(Plain(21), batch_size=4, sampler=make())
        with ours:
            for epoch in range(2):
                ours.sampler.set_epoch(epoch)
                theirs.sampler.set_epoch(epoch)
                assert [b.tolist() for b in ours] == [b.tolist() for b in theirs]


def test_adding_datasets_through_the_view():
    with DataLoader(Plain(3), batch_size=None, num_workers=1,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        combined = loader.dataset + Plain(2)
    assert isinstance(combined, ConcatDataset) and len(combined) == 5


import pytorch_lightning as pl  # noqa: E402 - a test dependency: a broken install fails


class Line(torch.utils.data.Dataset):
    """y = 3x - 1 with a little noise."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        x = torch.tensor([i / 64.0])
        return x, 3 * x - 1 + 0.01 * torch.randn(1)


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.val_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.val_losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _loader(**kwargs):
    return DataLoader(Line(), batch_size=8, num_workers=2, multiprocessing_context="forkserver",
                      seeding="batch", max_worker_restarts=5, **kwargs)  # fmt: skip


def test_lightning_trains_with_poolloader_loaders():
    model = Regressor()
    train, val = _loader(shuffle=True, persistent_workers=True), _loader()
    trainer = pl.Trainer(
        max_epochs=8, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    with train, val:
        trainer.fit(model, train, val)
    assert len(model.val_losses) == 8 * len(val)
    assert model.val_losses[-1] < model.val_losses[0] / 4


class Recorder(Regressor):
    """A Regressor that records each training batch it is given (its x values)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[float]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0][:, 0].tolist())
        return super().training_step(batch, batch_idx)


def test_lightning_resumes_a_checkpoint_saved_mid_epoch_with_the_batches_that_follow(tmp_path):
    """Lightning saves a loader's state_dict() with each checkpoint and loads it on
    ``fit(ckpt_path=...)``: training stopped after a checkpoint at step 6 of an
    8-step epoch and resumed from it trains on exactly the batches an uninterrupted
    run trained on after step 6, through the next epoch (shuffled, persistent)."""

    def fit(model, **kwargs):
        ckpt_path = kwargs.pop("ckpt_path", None)
        trainer = pl.Trainer(
            default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
            enable_progress_bar=False, enable_model_summary=False, **kwargs,
        )  # fmt: skip
        generator = torch.Generator().manual_seed(1)
        with _loader(shuffle=True, generator=generator, persistent_workers=True) as loader:
            trainer.fit(model, loader, ckpt_path=ckpt_path)

    whole = Recorder()
    fit(whole, max_epochs=2, enable_checkpointing=False)
    saver = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, save_on_train_epoch_end=False
    )
    stopped = Recorder()
    fit(stopped, max_steps=6, callbacks=[saver])
    resumed = Recorder()
    fit(resumed, max_epochs=2, enable_checkpointing=False, ckpt_path=saver.best_model_path)
    assert len(whole.seen) == 16
    assert stopped.seen == whole.seen[:6]
    assert resumed.seen == whole.seen[6:]


def test_lightning_recreates_the_loader_with_a_distributed_sampler():
    # What Lightning does for DDP: rebuild the loader from its arguments with a new sampler.
    from lightning_fabric.utilities.data import _update_dataloader

    original = _loader(shuffle=True, reorder_buffer=3)
    sampler = DistributedSampler(Line(), num_replicas=2, rank=1, shuffle=False)
    rebuilt = _update_dataloader(original, sampler)
    with original, rebuilt:
        assert type(rebuilt) is DataLoader
        assert rebuilt.sampler is sampler
        assert (rebuilt.seeding, rebuilt.max_worker_restarts, rebuilt.reorder_buffer) == (
            "batch",
            5,
            3,
        )
        assert isinstance(rebuilt.dataset, Line)
        xs = [x for batch in rebuilt for x in batch[0].flatten().tolist()]
    assert xs == [i / 64.0 for i in range(1, 64, 2)]


def _workers_gone(pids, within: float = 20.0) -> bool:
    import psutil

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not [p for p in pids if psutil.pid_exists(p) and
                psutil.Process(p).status() != psutil.STATUS_ZOMBIE]:  # fmt: skip
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("persistent", [False, True])
def test_lightnings_teardown_ends_the_workers_and_the_loader_stays_usable(persistent):
    """After fit, validate or test, Lightning ends torch's workers by dropping the
    persistent iterator (``loader._iterator = None``); poolloader's workers end
    there too, without waiting for the cycle collector to free the loader."""
    from pytorch_lightning.utilities.combined_loader import _shutdown_workers_and_reset_iterator

    with _loader(persistent_workers=persistent) as loader:
        assert len(list(loader)) == 8
        workers = [*loader._pool.worker_pids, loader._pool.template_pid]
        _shutdown_workers_and_reset_iterator(loader)
        assert loader._pool is None
        assert _workers_gone(workers)
        assert len(list(loader)) == 8


@pytest.mark.parametrize("persistent", [False, True])
def test_the_last_reference_to_a_loader_ends_its_workers(persistent):
    """No reference cycle keeps a used loader (and its workers) alive: its workers
    end when it is dropped, as torch's do, also with the cycle collector off."""
    loader = _loader(persistent_workers=persistent)
    assert len(list(loader)) == 8
    workers = [*loader._pool.worker_pids, loader._pool.template_pid]
    gc.disable()
    try:
        del loader
        assert _workers_gone(workers)
    finally:
        gc.enable()


@pytest.mark.parametrize("persistent", [False, True])
def test_an_iterator_keeps_its_dropped_loader_working_to_the_epochs_end(persistent):
    """``it = iter(DataLoader(...))``, as torch's own tests do: the loader has no
    other reference, and its epoch still runs to the end; then its workers end."""
    iterator = iter(_loader(persistent_workers=persistent))
    pool = iterator._pool
    gc.collect()
    assert len(list(iterator)) == 8
    assert pool.closed
