"""pad_collate and PadCollate: shapes, pad values, lengths, types, errors, spawn workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

import poolloader
from poolloader.datasets import ManifestDataset, PadCollate, pad_collate


def ramp(length: int, *rest: int) -> torch.Tensor:
    """A tensor of shape (length, *rest) holding 1, 2, 3, ... (never the pad value 0)."""
    size = int(np.prod((length, *rest)))
    return torch.arange(1, size + 1, dtype=torch.float32).reshape(length, *rest)


# ---------------------------------------------------------------- dict items


def test_variable_length_tensors_are_padded_to_the_longest_with_lengths():
    batch = pad_collate([{"x": ramp(3)}, {"x": ramp(5)}, {"x": ramp(2)}])
    assert batch["x"].shape == (3, 5)
    assert batch["x_len"].dtype == torch.int64
    assert batch["x_len"].tolist() == [3, 5, 2]
    assert batch["x"].tolist() == [
        [1, 2, 3, 0, 0],
        [1, 2, 3, 4, 5],
        [1, 2, 0, 0, 0],
    ]


def test_numpy_features_become_tensors_padded_on_the_time_axis():
    items = [
        {"feats": np.ones((4, 3), dtype=np.float32)},
        {"feats": np.ones((6, 3), dtype=np.float32)},
    ]
    batch = pad_collate(items)
    assert isinstance(batch["feats"], torch.Tensor)
    assert batch["feats"].dtype == torch.float32
    assert batch["feats"].shape == (2, 6, 3)
    assert batch["feats"][0, 4:].eq(0).all() and batch["feats"][0, :4].eq(1).all()
    assert batch["feats_len"].tolist() == [4, 6]


def test_pad_value_and_axis_can_be_chosen_globally_and_per_key():
    items = [
        {"tokens": torch.tensor([5, 6]), "wave": ramp(2, 3), "mel": ramp(2)},
        {"tokens": torch.tensor([7]), "wave": ramp(2, 1), "mel": ramp(1)},
    ]
    batch = pad_collate(items, pad_value={"tokens": -1}, axis={"wave": -1})
    assert batch["tokens"].tolist() == [[5, 6], [7, -1]]
    assert batch["wave"].shape == (2, 2, 3) and batch["wave_len"].tolist() == [3, 1]
    assert batch["wave"][1, :, 1:].eq(0).all()
    assert batch["mel"].tolist() == [[1, 2], [1, 0]]
    assert pad_collate([{"mel": ramp(1)}, {"mel": ramp(2)}], pad_value=9.0)["mel"].tolist() == [
        [1, 9],
        [1, 2],
    ]


def test_strings_and_other_objects_stay_lists_and_numbers_become_tensors():
    items = [
        {"text": "hello", "spk": 3, "dur": 1.5, "ok": True, "extra": None},
        {"text": "bye now", "spk": 4, "dur": 2.0, "ok": False, "extra": {"a": 1}},
    ]
    batch = pad_collate(items)
    assert batch["text"] == ["hello", "bye now"]
    assert batch["extra"] == [None, {"a": 1}]
    assert batch["spk"].dtype == torch.int64 and batch["spk"].tolist() == [3, 4]
    assert batch["dur"].dtype == torch.float64 and batch["dur"].tolist() == [1.5, 2.0]
    assert batch["ok"].dtype == torch.bool and batch["ok"].tolist() == [True, False]
    assert set(batch) == {"text", "spk", "dur", "ok", "extra"}


def test_numpy_strings_and_dates_stay_lists_as_torch_keeps_them():
    """np.loadtxt(..., dtype=str) gives np.str_ labels: a list, as default_collate gives."""
    labels, days = np.array(["cat", "dog"]), np.array(["2020-01-01", "2021-06-01"], "M8[D]")
    items = [{"x": ramp(2 + i), "label": labels[i], "day": days[i]} for i in range(2)]
    batch = pad_collate(items)
    assert (
        batch["label"] == torch.utils.data.default_collate([{"label": v} for v in labels])["label"]
    )
    assert batch["label"] == ["cat", "dog"] and type(batch["label"][0]) is np.str_
    assert batch["day"] == list(days) and batch["x"].shape == (2, 3)
    words = pad_collate([{"w": np.array(["a", "b"])}, {"w": np.array(["c"])}])["w"]
    assert [w.tolist() for w in words] == [["a", "b"], ["c"]]


def test_numpy_scalars_mixed_with_python_numbers_become_one_tensor():
    batch = pad_collate([{"n": np.int64(3), "f": np.float32(0.5)}, {"n": 4, "f": 1.0}])
    assert batch["n"].dtype == torch.int64 and batch["n"].tolist() == [3, 4]
    assert batch["f"].dtype == torch.float64 and batch["f"].tolist() == [0.5, 1.0]


def test_fixed_shape_values_are_stacked():
    embeddings = [torch.full((4,), float(i)) for i in range(3)]
    batch = pad_collate([{"spk": e, "mel": ramp(2, 3)} for e in embeddings])
    assert torch.equal(batch["spk"], torch.stack(embeddings))
    assert torch.equal(batch["mel"], torch.stack([ramp(2, 3)] * 3))
    assert batch["spk_len"].tolist() == [4, 4, 4]


def test_scalar_tensors_are_stacked_without_lengths():
    batch = pad_collate([{"y": torch.tensor(1.0)}, {"y": np.float32(2.0)}, {"y": np.array(3.0)}])
    assert batch["y"].shape == (3,)
    assert batch["y"].tolist() == [1.0, 2.0, 3.0]
    assert "y_len" not in batch


def test_equal_lengths_still_give_lengths_so_every_batch_has_the_same_keys():
    batch = pad_collate([{"x": ramp(4)}, {"x": ramp(4)}])
    assert batch["x"].shape == (2, 4)
    assert batch["x_len"].tolist() == [4, 4]


def test_mixed_dtypes_are_promoted():
    batch = pad_collate([{"x": torch.tensor([1, 2])}, {"x": torch.tensor([0.5])}])
    assert batch["x"].dtype == torch.float32
    assert batch["x"].tolist() == [[1.0, 2.0], [0.5, 0.0]]


# ---------------------------------------------------------------- tuples and bare arrays


def test_tuple_items_give_a_tuple_with_padded_positions_as_pairs():
    padded, labels, names = pad_collate([(ramp(2), 0, "a"), (ramp(3), 1, "b")])
    assert padded[0].shape == (2, 3) and padded[1].tolist() == [2, 3]
    assert labels.tolist() == [0, 1]
    assert names == ["a", "b"]
    as_list = pad_collate([[ramp(1), "a"], [ramp(2), "b"]])
    assert isinstance(as_list, list) and as_list[1] == ["a", "b"]
    assert pad_collate([(ramp(1),), (ramp(2),)], pad_value={0: 7.0})[0][0].tolist() == [
        [1, 7],
        [1, 2],
    ]


def test_namedtuple_items_give_the_namedtuple_as_torch_does():
    import collections

    Item = collections.namedtuple("Item", "feat label")
    batch = pad_collate([Item(ramp(2), 0), Item(ramp(3), 1)])
    assert type(batch) is Item and batch.label.tolist() == [0, 1]
    assert batch.feat[0].shape == (2, 3) and batch.feat[1].tolist() == [2, 3]
    same = pad_collate([Item(ramp(2), 0), Item(ramp(2), 1)])
    theirs = torch.utils.data.default_collate([Item(ramp(2), 0), Item(ramp(2), 1)])
    assert torch.equal(same.feat[0], theirs.feat) and torch.equal(same.label, theirs.label)


def test_bare_arrays_give_padded_and_lengths():
    padded, lengths = pad_collate([ramp(1), ramp(3)])
    assert padded.tolist() == [[1, 0, 0], [1, 2, 3]]
    assert lengths.tolist() == [1, 3]


# ---------------------------------------------------------------- errors


def test_shapes_that_differ_off_the_pad_axis_are_refused_naming_them():
    with pytest.raises(ValueError) as info:
        pad_collate([{"feats": ramp(4, 80)}, {"feats": ramp(5, 40)}])
    assert str(info.value) == (
        "pad_collate: key 'feats' has shape (5, 40) in item 1 but (4, 80) in item 0; only "
        "axis 0 may differ (pass axis= to pad another one)"
    )
    with pytest.raises(ValueError, match=r"has shape \(2, 2\) in item 1 but \(3,\) in item 0"):
        pad_collate([{"x": ramp(3)}, {"x": ramp(2, 2)}])


def test_batches_of_mismatched_items_are_refused():
    with pytest.raises(ValueError, match=r"empty batch"):
        pad_collate([])
    with pytest.raises(ValueError, match=r"item 1 has keys \['y'\], but item 0 has \['x'\]"):
        pad_collate([{"x": 1}, {"y": 1}])
    with pytest.raises(ValueError, match=r"item 1 is tuple of length 1, but item 0 has 2 elements"):
        pad_collate([(1, 2), (1,)])
    with pytest.raises(
        ValueError, match=r"key 'x' mixes scalars and arrays: shapes \[\(\), \(2,\)\]"
    ):
        pad_collate([{"x": torch.tensor(1.0)}, {"x": ramp(2)}])
    with pytest.raises(TypeError, match=r"takes a list of items, but got dict"):
        pad_collate({"x": [ramp(1)]})  # type: ignore[arg-type]


def test_axis_out_of_range_and_length_key_collisions_are_refused():
    with pytest.raises(
        ValueError, match=r"axis=2 is out of range for key 'x'.*give an axis in \[-1, 0\]"
    ):
        pad_collate([{"x": ramp(2)}], axis=2)
    with pytest.raises(
        ValueError, match=r"lengths go to 'x_len', but the items already have a key 'x_len'"
    ):
        pad_collate([{"x": ramp(2), "x_len": 2}])


# ---------------------------------------------------------------- pickling and workers


def test_pad_collate_and_pad_collate_objects_pickle():
    assert pickle.loads(pickle.dumps(pad_collate)) is pad_collate
    collate = pickle.loads(pickle.dumps(PadCollate(pad_value={"x": -2.0}, axis=0)))
    assert repr(collate) == "PadCollate(pad_value={'x': -2.0}, axis=0)"
    assert collate([{"x": ramp(1)}, {"x": ramp(2)}])["x"].tolist() == [[1, -2], [1, 2]]


@pytest.mark.parametrize(
    "loader_class", [DataLoader, poolloader.DataLoader], ids=["torch", "poolloader"]
)
def test_dataset_collate_works_in_spawned_workers(tmp_path: Path, loader_class):
    lines = []
    for i, frames in enumerate([3000, 8000, 16000, 5000]):
        sf.write(
            tmp_path / f"{i}.wav", np.full(frames, 0.5, dtype=np.float32), 16000, subtype="FLOAT"
        )
        lines.append(f"u{i} {i}.wav\n")
    (tmp_path / "wav.scp").write_text("".join(lines))
    (tmp_path / "text").write_text("".join(f"u{i} text {i}\n" for i in range(4)))
    ds = ManifestDataset({"audio": tmp_path / "wav.scp", "text": tmp_path / "text"}, duration=0.25)
    assert ds.collate is pad_collate  # what the workers receive: the function, by name
    loader = loader_class(
        ds, batch_size=2, num_workers=1, multiprocessing_context="spawn", collate_fn=ds.collate
    )
    batches = list(loader)
    if isinstance(loader, poolloader.DataLoader):
        loader.close()
    assert [b["id"] for b in batches] == [["u0", "u1"], ["u2", "u3"]]
    assert batches[0]["audio"].shape == (2, 4000)
    assert batches[0]["audio_len"].tolist() == [3000, 4000]
    assert batches[1]["audio_len"].tolist() == [4000, 4000]
    assert batches[1]["text"] == ["text 2", "text 3"]
    assert batches[0]["audio"][0, 3000:].eq(0).all() and batches[0]["audio"][0, :3000].eq(0.5).all()
