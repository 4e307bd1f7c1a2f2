"""ManifestDataset: manifest formats, mixing corpora, indexing, lengths, loaders, errors,
duration cropping and pickling, on real files written under tmp_path."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf
import torch
from torch.utils.data import BatchSampler, SequentialSampler

import poolloader.datasets
from poolloader import DataLoader
from poolloader.datasets import ManifestDataset, PadCollate, pad_collate

RATE = 16000


def write_wav(path: Path, frames: int, channels: int = 1, rate: int = RATE) -> np.ndarray:
    """Write a ramp (sample k of channel c is k / frames + c) exactly, as float WAV; return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.arange(frames, dtype=np.float32) / frames
    data = ramp if channels == 1 else np.stack([ramp + c for c in range(channels)], axis=1)
    sf.write(path, data, rate, subtype="FLOAT")
    return data


def write_lines(path: Path, *lines: str) -> Path:
    """Write a text manifest, one line each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def count_words(value: str) -> int:
    """A module-level loader: spawn workers can receive it by name."""
    return len(value.split())


@pytest.fixture
def corpora(tmp_path: Path) -> dict[str, Path]:
    """Two corpora, a/ (3 items) and b/ (2 items), with wav.scp, text, utt2dur, utt2num_samples.

    Both use the same relative file names (wav/1.wav ...) with different lengths, so
    reading the right file proves paths resolve against their own manifest.
    """
    frames = {"a": [8000, 16000, 4000], "b": [12000, 2000]}
    for corpus, sizes in frames.items():
        root = tmp_path / corpus
        keys = [f"{corpus}{i + 1}" for i in range(len(sizes))]
        for i, size in enumerate(sizes):
            write_wav(root / "wav" / f"{i + 1}.wav", size)
        write_lines(root / "wav.scp", *(f"{k} wav/{i + 1}.wav" for i, k in enumerate(keys)))
        write_lines(root / "text", *(f"{k} words of  {k} here" for k in keys))
        write_lines(root / "utt2dur", *(f"{k} {s / RATE}" for k, s in zip(keys, sizes)))
        write_lines(root / "utt2num_samples", *(f"{k} {s}" for k, s in zip(keys, sizes)))
    return {"a": tmp_path / "a", "b": tmp_path / "b", "root": tmp_path}


def mixed(corpora: dict[str, Path], **options: object) -> ManifestDataset:
    """The two corpora mixed: audio and text from both."""
    a, b = corpora["a"], corpora["b"]
    return ManifestDataset(
        {"audio": [a / "wav.scp", b / "wav.scp"], "text": [a / "text", b / "text"]},
        **options,  # type: ignore[arg-type]
    )


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


ROWS = [
    {"id": "t1", "audio": "wav/1.wav", "text": 'say "hi", then go', "duration": 0.5},
    {"id": "t2", "audio": "wav/2.wav", "text": "it's plain", "duration": 1.0},
]


def write_table(path: Path, format: str, rows: list[dict[str, object]]) -> Path:
    """Write rows as CSV (quoted), TSV (unquoted) or JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    if format == "jsonl":
        lines = [json.dumps(row) for row in rows]
    else:
        sep = "," if format == "csv" else "\t"
        quote = (lambda v: '"' + str(v).replace('"', '""') + '"') if format == "csv" else str
        lines = [sep.join(columns)] + [sep.join(quote(row[c]) for c in columns) for row in rows]
    return write_lines(path, *lines)


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


# ---------------------------------------------------------------- errors that point at the line


def test_malformed_kaldi_line_names_path_line_and_content(tmp_path):
    scp = write_lines(tmp_path / "wav.scp", "utt1 a.wav", "", "utt7")
    with pytest.raises(ValueError) as info:
        ManifestDataset({"audio": scp})
    assert str(info.value) == f"{scp} line 3: expected 'id value', got 'utt7'"


def test_duplicate_id_names_both_lines(corpora):
    a = corpora["a"]
    again = write_lines(corpora["root"] / "c" / "wav.scp", "c1 wav/1.wav", "a2 wav/2.wav")
    with pytest.raises(ValueError) as info:
        ManifestDataset({"audio": [a / "wav.scp", again]})
    message = str(info.value)
    assert message.startswith(f"{again} line 2: duplicate id 'a2' in field 'audio'")
    assert f"first given at {a / 'wav.scp'} line 2" in message


def test_ids_missing_from_a_field_are_listed_with_their_lines(corpora):
    a = corpora["a"]
    text = write_lines(corpora["root"] / "text2", "a1 x")
    with pytest.raises(ValueError) as info:
        ManifestDataset({"audio": a / "wav.scp", "text": text})
    message = str(info.value)
    assert "field 'text' has no entry for 2 id(s) of field 'audio'" in message
    assert f"'a2' ({a / 'wav.scp'} line 2), 'a3' ({a / 'wav.scp'} line 3)" in message
    extra = write_lines(corpora["root"] / "text3", "a1 x", "a2 y", "a3 z", "q1 w")
    with pytest.raises(
        ValueError,
        match=r"field 'audio' has no entry for 1 id\(s\) of field 'text': 'q1' \(.*text3 line 4\)",
    ):
        ManifestDataset({"audio": a / "wav.scp", "text": extra})


def test_missing_audio_file_names_path_id_field_and_manifest_line(corpora):
    a = corpora["a"]
    (a / "wav" / "3.wav").unlink()
    ds = ManifestDataset({"audio": a / "wav.scp"})
    with pytest.raises(FileNotFoundError) as info:
        ds["a3"]
    assert str(info.value) == (
        f"{a / 'wav' / '3.wav'}: no such file for id 'a3' "
        f"(field 'audio', from {a / 'wav.scp'} line 3)"
    )


def test_missing_npy_file_names_id_and_line(tmp_path):
    ds = ManifestDataset({"feats": write_lines(tmp_path / "feats.scp", "u1 nope.npy")})
    with pytest.raises(
        FileNotFoundError, match=r"for id 'u1' \(field 'feats', from .*feats.scp line 1\)"
    ):
        ds[0]


def test_user_loader_error_keeps_its_type_and_gains_a_note(tmp_path):
    ds = ManifestDataset({"n": write_lines(tmp_path / "n", "u1 1", "u2 x")}, loaders={"n": "int"})
    with pytest.raises(ValueError, match=r"invalid literal") as info:
        ds["u2"]
    assert any("for id 'u2' (field 'n', from" in note for note in info.value.__notes__)


def test_missing_manifest_file_says_which_field(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"nope.scp: no such manifest file \(given for field 'audio'\)"
    ):
        ManifestDataset({"audio": tmp_path / "nope.scp"})


def test_empty_manifests_and_reserved_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no items in .*empty.scp"):
        ManifestDataset({"audio": write_lines(tmp_path / "empty.scp")})
    with pytest.raises(ValueError, match=r"may not be called 'id'"):
        ManifestDataset({"id": write_lines(tmp_path / "ids", "u1 x")})
    with pytest.raises(ValueError, match=r"non-empty mapping"):
        ManifestDataset({})


def test_table_rows_of_the_wrong_width_name_path_line_and_id(tmp_path):
    table = write_lines(tmp_path / "m.csv", "id,audio,text", "u1,a.wav,hi", "u2,b.wav")
    with pytest.raises(ValueError) as info:
        ManifestDataset.from_table(table)
    assert str(info.value) == (
        f"{table} line 3: the row of id 'u2' has 2 columns, but the header names 3 "
        "(id, audio, text): ['u2', 'b.wav']; quote values that hold the delimiter (CSV), "
        "or check for a missing or extra delimiter"
    )
    tsv = write_lines(tmp_path / "m.tsv", "text\tid", "hi\tu1", "a\tb\tu2")
    with pytest.raises(ValueError, match=r"m.tsv line 3: the row of id 'b' has 3 columns"):
        ManifestDataset.from_table(tsv)
    no_id = write_lines(tmp_path / "n.tsv", "text\tid", "hi\tu1", "lonely")
    with pytest.raises(ValueError, match=r"n.tsv line 3: a row has 1 columns"):
        ManifestDataset.from_table(no_id)


def test_quoted_csv_values_may_span_lines_and_errors_name_the_row_start(tmp_path):
    table = write_lines(
        tmp_path / "m.csv", "id,text,duration", 'u1,"two\nlines, quoted",1.0', "u2,plain,x"
    )
    ds = ManifestDataset.from_table(table, loaders={"duration": "float"})
    assert ds["u1"] == {"id": "u1", "text": "two\nlines, quoted", "duration": 1.0}
    with pytest.raises(ValueError, match=r"m.csv line 4: expected a number for id 'u2', got 'x'"):
        ManifestDataset.from_table(table, lengths="duration")
    unclosed = write_lines(tmp_path / "o.csv", "id,text", "u1,ok", 'u2,"never closed', "u3,c")
    with pytest.raises(ValueError, match=r"o.csv line 3: malformed CSV \(unexpected end of data\)"):
        ManifestDataset.from_table(unclosed)


def test_a_byte_order_mark_from_a_spreadsheet_is_ignored(tmp_path):
    table = tmp_path / "excel.csv"
    table.write_text("id,text\nu1,hi\n", encoding="utf-8-sig")
    assert ManifestDataset.from_table(table)["u1"] == {"id": "u1", "text": "hi"}
    kaldi = tmp_path / "text"
    kaldi.write_text("u1 hi\n", encoding="utf-8-sig")
    assert ManifestDataset({"text": kaldi}).ids == ("u1",)


def test_jsonl_values_keep_their_json_types_and_ids_may_be_integers(tmp_path):
    rows = [
        '{"id": 7, "spk": 3, "dur": 1.5, "tags": ["a", "b"]}',
        "",
        '{"id": "x", "spk": 4, "dur": 2, "tags": []}',
    ]
    ds = ManifestDataset.from_table(write_lines(tmp_path / "m.ndjson", *rows), lengths="dur")
    assert ds.ids == ("7", "x")
    assert ds["7"] == {"id": "7", "spk": 3, "dur": 1.5, "tags": ["a", "b"]}
    assert ds.lengths.tolist() == [1.5, 2.0]
    with pytest.raises(ValueError, match=r"m2.jsonl line 1: expected a JSON object, got list"):
        ManifestDataset.from_table(write_lines(tmp_path / "m2.jsonl", "[1, 2]"))
    with pytest.raises(ValueError, match=r"m3.jsonl line 2: expected a non-empty id, got ''"):
        ManifestDataset.from_table(
            write_lines(tmp_path / "m3.jsonl", '{"id": "a", "t": 1}', '{"id": "", "t": 2}')
        )


def test_table_errors_name_path_line_and_id(tmp_path):
    bad_json = write_lines(
        tmp_path / "m.jsonl", '{"id": "u1", "text": "a"}', '{"id": "u2", "text": '
    )
    with pytest.raises(ValueError, match=r"m.jsonl line 2: not valid JSON"):
        ManifestDataset.from_table(bad_json)
    missing = write_lines(tmp_path / "n.jsonl", '{"id": "u1", "text": "a"}', '{"id": "u2"}')
    with pytest.raises(ValueError, match=r"n.jsonl line 2: no column 'text' for id 'u2'"):
        ManifestDataset.from_table(missing)
    no_id = write_lines(tmp_path / "o.csv", "utt,text", "u1,a")
    with pytest.raises(ValueError, match=r"o.csv line 2: no id column 'id'.*pass id_column="):
        ManifestDataset.from_table(no_id)
    twice = write_lines(tmp_path / "p.tsv", "id\ttext", "u1\ta", "u1\tb")
    with pytest.raises(
        ValueError, match=r"p.tsv line 3: duplicate id 'u1' .* first given at .*p.tsv line 2"
    ):
        ManifestDataset.from_table(twice)
    with pytest.raises(ValueError, match=r"cannot tell the format of .*m.txt"):
        ManifestDataset.from_table(write_lines(tmp_path / "m.txt", "id,text"))


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


def test_pickle_costs_about_the_manifest_text_and_drops_the_id_index(tmp_path):
    n = 3000
    scp = write_lines(tmp_path / "wav.scp", *(f"utt{i:05d} wav/utt{i:05d}.wav" for i in range(n)))
    text = write_lines(tmp_path / "text", *(f"utt{i:05d} words number {i}" for i in range(n)))
    durations = write_lines(tmp_path / "utt2dur", *(f"utt{i:05d} {i % 9 + 1}.5" for i in range(n)))
    ds = ManifestDataset({"audio": scp, "text": text}, lengths=durations, loaders={"audio": "text"})
    manifest_bytes = sum(os.path.getsize(p) for p in (scp, text, durations))
    data = pickle.dumps(ds)
    assert len(data) < 1.2 * manifest_bytes
    assert "_positions" not in ds.__getstate__()
    copy = pickle.loads(data)
    assert copy["utt02999"] == {
        "id": "utt02999",
        "audio": "wav/utt02999.wav",
        "text": "words number 2999",
    }
    assert copy[7]["id"] == "utt00007" and copy.lengths[7] == 8.5


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
