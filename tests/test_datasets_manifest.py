"""ManifestDataset: manifest formats, mixing corpora, indexing, lengths, loaders,
duration cropping and pickling, on real files written under tmp_path."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from _manifests import RATE, ROWS, count_words, mixed, write_lines, write_table, write_wav
from torch.utils.data import BatchSampler, SequentialSampler

import poolloader.datasets
from poolloader import DataLoader
from poolloader.datasets import ManifestDataset, PadCollate, pad_collate

# ---------------------------------------------------------------- Kaldi-style manifests


def test_kaldi_fields_load_audio_as_float32_time_first_and_text_as_written(corpora):
    a = corpora["a"]
    ds = ManifestDataset({"audio": a / "wav.scp", "text": a / "text"})
    item = ds["a2"]
    assert list(item) == ["id", "audio", "audio_sample_rate", "text"]
    assert item["id"] == "a2"
    assert item["audio"].dtype == torch.float32
    assert item["audio"].shape == (16000,)
    assert torch.equal(item["audio"], torch.arange(16000, dtype=torch.float32) / 16000)
    assert item["audio_sample_rate"] == RATE
    assert item["text"] == "words of  a2 here"
    assert ds.fields == ("audio", "text")
    assert ds.loaders == {"audio": "audio", "text": "text"}


def test_several_files_per_field_mix_corpora_in_file_order(corpora):
    ds = mixed(corpora)
    assert len(ds) == 5
    assert ds.ids == ("a1", "a2", "a3", "b1", "b2")
    # b/wav/1.wav has 12000 frames, a/wav/1.wav 8000: each path is read from its own corpus.
    assert ds["b1"]["audio"].shape == (12000,)
    assert ds["a1"]["audio"].shape == (8000,)
    assert ds["b2"]["text"] == "words of  b2 here"


def test_multichannel_audio_is_samples_by_channels(tmp_path):
    write_wav(tmp_path / "st.wav", 500, channels=2)
    ds = ManifestDataset({"audio": write_lines(tmp_path / "wav.scp", "s1 st.wav")})
    audio = ds["s1"]["audio"]
    assert audio.shape == (500, 2)
    assert torch.allclose(audio[:, 1] - audio[:, 0], torch.ones(500))
    assert torch.equal(audio[:, 0], torch.arange(500, dtype=torch.float32) / 500)


def test_blank_lines_are_skipped_and_values_keep_inner_spaces(tmp_path):
    text = write_lines(tmp_path / "text", "", "u1   hello   big world  ", "   ", "u2 x")
    ds = ManifestDataset({"text": text})
    assert ds.ids == ("u1", "u2")
    assert ds["u1"]["text"] == "hello   big world"


# ---------------------------------------------------------------- tables


@pytest.mark.parametrize("format", ["csv", "tsv", "jsonl"])
def test_from_table_reads_every_format(tmp_path, format):
    write_wav(tmp_path / "wav" / "1.wav", 8000)
    write_wav(tmp_path / "wav" / "2.wav", 16000)
    table = write_table(tmp_path / f"train.{format}", format, ROWS)
    ds = ManifestDataset.from_table(table, lengths="duration")
    assert ds.ids == ("t1", "t2")
    assert ds.fields == ("audio", "text", "duration")
    assert ds["t1"]["text"] == 'say "hi", then go'
    assert ds["t2"]["audio"].shape == (16000,)
    assert ds["t2"]["duration"] == 1.0
    assert ds.lengths.tolist() == [0.5, 1.0]


def test_from_table_mixes_tables_of_different_formats(tmp_path):
    a = write_table(tmp_path / "a" / "m.csv", "csv", ROWS)
    other = [{"id": "x9", "audio": "wav/9.wav", "text": "nine", "duration": 2.5}]
    b = write_table(tmp_path / "b" / "m.jsonl", "jsonl", other)
    ds = ManifestDataset.from_table([a, b], fields=["text", "duration"], lengths="duration")
    assert ds.ids == ("t1", "t2", "x9")
    assert ds.fields == ("text", "duration")
    assert ds["x9"] == {"id": "x9", "text": "nine", "duration": 2.5}
    assert ds.lengths.tolist() == [0.5, 1.0, 2.5]


def test_from_table_id_column_and_explicit_format(tmp_path):
    table = write_lines(tmp_path / "list.txt", "utt\tspk", "u1\tS1", "u2\tS2")
    ds = ManifestDataset.from_table(table, id_column="utt", format="tsv")
    assert ds.ids == ("u1", "u2")
    assert ds["u2"] == {"id": "u2", "spk": "S2"}


def test_from_table_with_another_id_column_and_an_id_column_says_what_to_do(tmp_path):
    table = write_lines(tmp_path / "t.csv", "id,utt,duration", "a,u1,1.5", "b,u2,2.0")
    with pytest.raises(ValueError, match=r"t\.csv has a column 'id' besides the id column 'utt'"):
        ManifestDataset.from_table(table, id_column="utt")
    ds = ManifestDataset.from_table(table, id_column="utt", fields=["duration"])
    assert ds["u2"] == {"id": "u2", "duration": "2.0"}


# ---------------------------------------------------------------- indexing


def test_index_by_id_position_negative_position_and_numpy_integer(corpora):
    ds = mixed(corpora)
    assert ds[1]["id"] == "a2"
    assert ds[-1]["id"] == "b2"
    assert ds[np.int64(3)]["id"] == "b1"
    assert ds[torch.tensor(3)]["id"] == "b1" and ds[np.array(-2)]["id"] == "b1"
    assert torch.equal(ds["a2"]["audio"], ds[1]["audio"])


def test_list_index_returns_items_in_the_order_asked(corpora):
    ds = mixed(corpora)
    items = ds[["b1", "a1"]]
    assert [item["id"] for item in items] == ["b1", "a1"]
    assert [item["id"] for item in ds[[4, 0]]] == ["b2", "a1"]
    assert [item["id"] for item in ds[np.array([2, 3])]] == ["a3", "b1"]
    assert [item["id"] for item in ds[range(2)]] == ["a1", "a2"]


def test_list_index_with_collate_fn_returns_the_batch(corpora):
    ds = mixed(corpora, collate_fn=PadCollate(pad_value=-1.0))
    batch = ds[["a3", "a1"]]
    assert batch["id"] == ["a3", "a1"]
    assert batch["audio"].shape == (2, 8000)
    assert batch["audio_len"].tolist() == [4000, 8000]
    assert batch["audio"][0, 4000:].eq(-1.0).all()
    assert ds.collate([ds["a3"], ds["a1"]])["audio"][0, 4000:].eq(-1.0).all()


def test_collate_is_the_function_itself_so_it_pickles_without_the_dataset(corpora):
    ds = mixed(corpora)
    assert ds.collate is pad_collate
    assert len(pickle.dumps(ds.collate)) < 100
    collate = PadCollate(pad_value=-1.0)
    ds.collate_fn = collate
    assert ds.collate is collate and len(pickle.dumps(ds.collate)) < 200


def test_collate_method_pads_by_default(corpora):
    ds = mixed(corpora)
    batch = ds.collate(ds[["a1", "b2"]])
    assert batch["audio"].shape == (2, 8000)
    assert batch["audio_len"].tolist() == [8000, 2000]
    assert batch["text"] == ["words of  a1 here", "words of  b2 here"]
    assert batch["audio_sample_rate"].tolist() == [RATE, RATE]


def test_bad_indices_say_what_was_wrong(corpora):
    ds = mixed(corpora)
    with pytest.raises(KeyError, match=r"no item with id 'zz' in this dataset"):
        ds["zz"]
    with pytest.raises(IndexError, match=r"position 5 is out of range for a dataset of 5 items"):
        ds[5]
    with pytest.raises(TypeError, match=r"should be an id .* but got float: 1.5"):
        ds[1.5]
    with pytest.raises(TypeError, match=r"but got bool"):
        ds[True]


# ---------------------------------------------------------------- lengths


def test_lengths_from_utt2dur_files_of_several_corpora(corpora):
    ds = mixed(corpora, lengths=[corpora["a"] / "utt2dur", corpora["b"] / "utt2dur"])
    assert ds.lengths.dtype == np.float64
    assert ds.lengths.tolist() == [0.5, 1.0, 0.25, 0.75, 0.125]


def test_lengths_from_utt2num_samples_ignore_ids_of_other_corpora(corpora):
    a = corpora["a"]
    both = write_lines(
        corpora["root"] / "all2num",
        *(corpora["a"] / "utt2num_samples").read_text().splitlines(),
        *(corpora["b"] / "utt2num_samples").read_text().splitlines(),
    )
    ds = ManifestDataset({"audio": a / "wav.scp"}, lengths=both)
    assert ds.lengths.tolist() == [8000, 16000, 4000]


def test_lengths_from_an_audio_field_are_seconds_from_headers(corpora):
    ds = mixed(corpora, lengths="audio")
    assert ds.lengths.tolist() == [0.5, 1.0, 0.25, 0.75, 0.125]


def test_lengths_are_read_only_in_the_dataset_its_subsets_and_copies(corpora):
    ds = mixed(corpora, lengths="audio")
    for view in (ds, ds.subset([1, 0]), pickle.loads(pickle.dumps(ds))):
        with pytest.raises(ValueError, match=r"read-only"):
            view.lengths[0] = 9.0
    assert ds.lengths[0] == 0.5


def test_lengths_from_an_audio_field_name_a_missing_file_and_its_line(corpora):
    a = corpora["a"]
    (a / "wav" / "2.wav").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"2.wav: no such file for id 'a2' \(field 'audio', from .*wav.scp line 2\)",
    ):
        ManifestDataset({"audio": a / "wav.scp"}, lengths="audio")


def test_lengths_from_a_table_column_name_path_line_and_id(tmp_path):
    rows = [{"id": "t1", "duration": 0.5}, {"id": "t2", "duration": "long"}]
    table = write_table(tmp_path / "m.jsonl", "jsonl", rows)
    with pytest.raises(
        ValueError, match=r"m.jsonl line 2: expected a number for id 't2', got 'long'"
    ):
        ManifestDataset.from_table(table, lengths="duration")


def test_no_lengths_raises_attribute_error_with_a_hint(corpora):
    ds = mixed(corpora)
    assert not hasattr(ds, "lengths")
    with pytest.raises(AttributeError, match=r"pass lengths="):
        _ = ds.lengths


def test_lengths_errors_name_ids_and_lines(corpora):
    a = corpora["a"]
    partial = write_lines(corpora["root"] / "short2dur", "a1 0.5", "a3 0.25")
    with pytest.raises(ValueError, match=r"have no entry for 1 of the 3 ids: 'a2'"):
        ManifestDataset({"audio": a / "wav.scp"}, lengths=partial)
    bad = write_lines(corpora["root"] / "bad2dur", "a1 0.5", "a2 long", "a3 0.25")
    with pytest.raises(
        ValueError, match=r"bad2dur line 2: expected a number for id 'a2', got 'long'"
    ):
        ManifestDataset({"audio": a / "wav.scp"}, lengths=bad)
    with pytest.raises(ValueError, match=r"names neither a field of the dataset"):
        ManifestDataset({"audio": a / "wav.scp"}, lengths="durations")


# ---------------------------------------------------------------- loaders


def test_npy_text_file_int_and_user_function_loaders(tmp_path):
    np.save(tmp_path / "f1.npy", np.arange(12, dtype=np.float32).reshape(4, 3))
    (tmp_path / "t1.txt").write_text("a transcript\n", encoding="utf-8")
    ds = ManifestDataset(
        {
            "feats": write_lines(tmp_path / "feats.scp", "u1 f1.npy"),
            "text": write_lines(tmp_path / "text.scp", "u1 t1.txt"),
            "speaker": write_lines(tmp_path / "utt2spk", "u1 0042"),
            "words": write_lines(tmp_path / "words", "u1 one two three"),
        },
        loaders={"speaker": "int", "words": count_words},
    )
    item = ds["u1"]
    assert isinstance(item["feats"], np.ndarray) and item["feats"].shape == (4, 3)
    assert item["feats"][3, 2] == 11.0
    assert item["text"] == "a transcript"
    assert item["speaker"] == 42
    assert item["words"] == 3
    assert ds.loaders == {
        "feats": "npy",
        "text": "text_file",
        "speaker": "int",
        "words": count_words,
    }


def test_text_loader_overrides_a_path_guess(tmp_path):
    ds = ManifestDataset(
        {"audio": write_lines(tmp_path / "wav.scp", "u1 missing.wav")}, loaders={"audio": "text"}
    )
    assert ds["u1"]["audio"] == "missing.wav"


def test_lambda_and_nested_loaders_are_refused_with_the_fix(tmp_path):
    text = write_lines(tmp_path / "text", "u1 hi")

    def nested(value: str) -> str:
        return value

    with pytest.raises(TypeError, match=r"the loader of field 'text' is a lambda.*module level"):
        ManifestDataset({"text": text}, loaders={"text": lambda v: v})
    with pytest.raises(TypeError, match=r"defined inside another function.*module level"):
        ManifestDataset({"text": text}, loaders={"text": nested})
    with pytest.raises(TypeError, match=r"collate_fn is a lambda"):
        ManifestDataset({"text": text}, collate_fn=lambda batch: batch)


def test_unknown_loader_names_and_fields_are_refused(tmp_path):
    text = write_lines(tmp_path / "text", "u1 hi")
    with pytest.raises(ValueError, match=r"should be one of \['audio', 'float'.* but got 'wav'"):
        ManifestDataset({"text": text}, loaders={"text": "wav"})
    with pytest.raises(ValueError, match=r"field\(s\) \['txt'\] that the dataset does not have"):
        ManifestDataset({"text": text}, loaders={"txt": "text"})


def test_missing_soundfile_says_how_to_install_it(corpora, monkeypatch):
    ds = mixed(corpora)
    monkeypatch.setitem(sys.modules, "soundfile", None)  # what an uninstalled module looks like
    with pytest.raises(ImportError, match=r"pip install poolloader\[audio\]"):
        ds["a1"]


def test_relative_paths_follow_the_manifest_not_the_working_directory(corpora, monkeypatch):
    ds = mixed(corpora)
    monkeypatch.chdir(corpora["b"])
    assert ds["a1"]["audio"].shape == (8000,)


def test_root_makes_paths_relative_to_it(corpora):
    scp = write_lines(corpora["root"] / "lists" / "wav.scp", "x1 a/wav/2.wav", "x2 b/wav/1.wav")
    ds = ManifestDataset({"audio": scp}, root=corpora["root"])
    assert ds["x1"]["audio"].shape == (16000,)
    assert ds["x2"]["audio"].shape == (12000,)


# ---------------------------------------------------------------- duration cropping


def test_duration_crops_audio_to_that_many_seconds_of_contiguous_samples(corpora):
    ds = mixed(corpora, duration=0.1)
    audio = ds["a2"]["audio"]  # a 16000-frame ramp k / 16000
    assert audio.shape == (1600,)
    start = round(audio[0].item() * 16000)
    assert torch.equal(audio, torch.arange(start, start + 1600, dtype=torch.float32) / 16000)


def test_crops_are_reproducible_under_torch_seed_and_vary_with_it(corpora):
    ds = mixed(corpora, duration=0.05)

    def crop_start(seed: int) -> int:
        torch.manual_seed(seed)
        return round(ds["a2"]["audio"][0].item() * 16000)

    assert crop_start(7) == crop_start(7)
    assert len({crop_start(seed) for seed in range(8)}) > 1


def test_files_shorter_than_duration_are_read_whole(corpora):
    ds = mixed(corpora, duration=0.3)
    assert ds["b2"]["audio"].shape == (2000,)
    assert ds["a1"]["audio"].shape == (4800,)


def test_duration_is_a_plain_attribute_read_at_each_item(corpora):
    ds = mixed(corpora, duration=0.1)
    assert ds["a2"]["audio"].shape == (1600,)
    ds.duration = 2 * ds.duration
    assert ds["a2"]["audio"].shape == (3200,)
    ds.duration = None
    assert ds["a2"]["audio"].shape == (16000,)
    assert "duration" in vars(ds) and not isinstance(type(ds).__dict__.get("duration"), property)


def test_equally_long_audio_fields_of_one_item_share_the_crop(corpora):
    a = corpora["a"]
    ds = ManifestDataset({"clean": a / "wav.scp", "noisy": a / "wav.scp"}, duration=0.05)
    for seed in range(4):
        torch.manual_seed(seed)
        item = ds["a2"]
        assert torch.equal(item["clean"], item["noisy"])


def test_invalid_duration_is_refused_when_given_and_when_used(corpora):
    with pytest.raises(ValueError, match=r"positive number of seconds or None.*duration=0"):
        mixed(corpora, duration=0)
    ds = mixed(corpora)
    ds.duration = -1.0
    with pytest.raises(ValueError, match=r"but got duration=-1.0"):
        ds["a1"]


# ---------------------------------------------------------------- pickling, subsets, surface


def test_pickle_round_trip_is_small_and_loads_the_same_items(corpora):
    ds = mixed(corpora, lengths="audio", duration=0.05, collate_fn=PadCollate(pad_value=-1.0))
    data = pickle.dumps(ds)
    assert len(data) < 4000  # ids, values and settings: no audio, no file handle
    copy = pickle.loads(data)
    assert copy.ids == ds.ids and copy.duration == 0.05
    assert np.array_equal(copy.lengths, ds.lengths)
    for seed in (0, 1):
        torch.manual_seed(seed)
        expected = ds["b1"]["audio"]
        torch.manual_seed(seed)
        assert torch.equal(copy["b1"]["audio"], expected)
    assert copy[["a1", "a2"]]["audio_len"].tolist() == [800, 800]


def write_text_manifest(tmp_path, n: int) -> ManifestDataset:
    """A dataset of ``n`` items with text-valued fields and utt2dur lengths."""
    scp = write_lines(tmp_path / "wav.scp", *(f"utt{i:05d} wav/utt{i:05d}.wav" for i in range(n)))
    text = write_lines(tmp_path / "text", *(f"utt{i:05d} words number {i}" for i in range(n)))
    durations = write_lines(tmp_path / "utt2dur", *(f"utt{i:05d} {i % 9 + 1}.5" for i in range(n)))
    return ManifestDataset(
        {"audio": scp, "text": text}, lengths=durations, loaders={"audio": "text"}
    )


def test_pickle_is_a_few_handles_whatever_the_number_of_items(tmp_path):
    # Ids, values and lengths live in shared memory: a worker receives handles to them.
    small = write_text_manifest(tmp_path / "small", 3)
    ds = write_text_manifest(tmp_path / "big", 3000)
    data = pickle.dumps(ds)
    assert len(data) < 4000
    assert abs(len(data) - len(pickle.dumps(small))) < 200
    copy = pickle.loads(data)
    assert copy["utt02999"] == {
        "id": "utt02999",
        "audio": "wav/utt02999.wav",
        "text": "words number 2999",
    }
    assert copy[7]["id"] == "utt00007" and copy.lengths[7] == 8.5
    assert np.shares_memory(copy.lengths, ds.lengths)  # the same mapping in one process


def _mappers(name: str) -> set[int]:
    """Pids of the processes that map shared-memory segment ``name``."""
    found = set()
    for pid in psutil.pids():
        try:
            if name in Path(f"/proc/{pid}/maps").read_text():
                found.add(pid)
        except OSError:
            pass
    return found


def test_workers_map_the_dataset_instead_of_copying_it(tmp_path):
    ds = write_text_manifest(tmp_path, 2000)
    rows = ds._items.rows._records.segment.name
    with DataLoader(
        ds, batch_size=50, num_workers=2, multiprocessing_context="forkserver", collate_fn=list
    ) as loader:
        seen = [item["id"] for batch in loader for item in batch]
        holders = _mappers(rows)
    assert seen == list(ds.ids)
    # The main process, the template the workers are forked from, and both workers.
    assert os.getpid() in holders and len(holders) == 4


def test_no_file_stays_open_between_items(corpora):
    process = psutil.Process()
    before = {f.path for f in process.open_files()}
    ds = mixed(corpora, lengths="audio", duration=0.05)
    for key in ds.ids:
        ds[key]
    opened = {f.path for f in process.open_files()} - before
    assert not [path for path in opened if str(corpora["root"]) in path]


def test_whole_batch_sampling_and_errors_through_poolloader_workers(corpora):
    # The sampler yields lists of positions and the dataset's collate_fn builds each batch.
    ds = mixed(corpora, lengths="audio", collate_fn=pad_collate)
    (corpora["b"] / "wav" / "2.wav").unlink()  # b2, alone in the last batch
    batches_of_ids = BatchSampler(SequentialSampler(range(len(ds))), batch_size=2, drop_last=False)
    with DataLoader(
        ds, sampler=batches_of_ids, batch_size=None, num_workers=1, multiprocessing_context="spawn"
    ) as loader:
        batches = iter(loader)
        first, second = next(batches), next(batches)
        with pytest.raises(FileNotFoundError) as info:
            next(batches)
    assert [first["id"], second["id"]] == [["a1", "a2"], ["a3", "b1"]]
    assert [first["audio_len"].tolist(), second["audio_len"].tolist()] == [
        [8000, 16000],
        [4000, 12000],
    ]
    assert second["audio"].shape == (2, 12000)
    # The error reaches the caller naming the file, the id, the field and the manifest line.
    assert str(info.value) == (
        f"{corpora['b'] / 'wav' / '2.wav'}: no such file for id 'b2' "
        f"(field 'audio', from {corpora['b'] / 'wav.scp'} line 2)"
    )


def test_subset_keeps_settings_and_restricts_everything(corpora):
    ds = mixed(corpora, lengths="audio", duration=0.05)
    part = ds.subset(["b1", "a2"])
    assert part.ids == ("b1", "a2") and len(part) == 2
    assert part.lengths.tolist() == [0.75, 1.0]
    assert part.duration == 0.05
    assert part[0]["id"] == "b1" and part["a2"]["audio"].shape == (800,)
    assert ds.subset([4, 0]).ids == ("b2", "a1")
    assert len(ds) == 5
    with pytest.raises(ValueError, match=r"more than once: 'a1'$"):
        ds.subset(["a1", 0])
    with pytest.raises(KeyError, match=r"'nope'"):
        ds.subset(["nope"])


def test_repr_names_size_loaders_and_duration(corpora):
    ds = mixed(corpora, duration=1.5)
    assert repr(ds) == (
        "ManifestDataset(5 items, loaders={'audio': 'audio', 'text': 'text'}, duration=1.5)"
    )


def test_public_names_are_sorted_exported_and_documented():
    names = poolloader.datasets.__all__
    assert names == sorted(names)
    assert set(names) == {
        "ManifestDataset",
        "PadCollate",
        "StreamBatch",
        "StreamDataset",
        "pad_collate",
        "select",
        "select_steps",
    }
    for name in names:
        assert getattr(poolloader.datasets, name).__doc__
    assert os.path.basename(poolloader.datasets.__file__) == "__init__.py"
