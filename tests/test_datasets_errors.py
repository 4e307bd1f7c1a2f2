"""ManifestDataset errors point at the manifest, the line and the id, on real
files written under tmp_path."""

from __future__ import annotations

import json
import sys

import pytest
from _manifests import write_lines

from poolloader.datasets import ManifestDataset

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
    where = "for id 'u2' (field 'n', from"
    if sys.version_info >= (3, 11):
        assert any(where in note for note in info.value.__notes__)
    else:  # no notes: the message says it
        assert f"\n(while loading {where}" in str(info.value)


class _NoNotes(ValueError):
    """An error as Python 3.10 has them: without ``add_note``."""

    def __getattribute__(self, name: str) -> object:
        if name == "add_note":
            raise AttributeError(name)
        return super().__getattribute__(name)


def _refuse(value: str) -> object:
    raise _NoNotes(f"cannot read {value!r}")


def test_without_notes_a_user_loader_error_says_where_in_its_message(tmp_path):
    """Python 3.10 has no exception notes: where the message is plain, it takes the
    id, field and line itself, and the error keeps its type."""
    ds = ManifestDataset({"n": write_lines(tmp_path / "n", "u1 1")}, loaders={"n": _refuse})
    with pytest.raises(_NoNotes) as info:
        ds["u1"]
    assert str(info.value).startswith("cannot read '1'\n(while loading for id 'u1' (field 'n', ")
    assert not getattr(info.value, "__notes__", None)


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


# ---------------------------------------------------------------- files that are valid, or nearly


def test_a_csv_value_longer_than_the_csv_modules_default_limit_is_read(tmp_path):
    """Python's csv module writes values of any length but, by default, reads back only
    131,072 characters of one; a manifest's long transcript is read whole."""
    import csv

    text = "word " * 30_000
    for name, delimiter in (("long.csv", ","), ("long.tsv", "\t")):
        path = tmp_path / name
        with open(path, "w", newline="") as file:
            writer = csv.writer(file, delimiter=delimiter)
            writer.writerows([["id", "text"], ["u1", text], ["u2", "short"]])
        dataset = ManifestDataset.from_table(path)
        assert dataset[0]["text"] == text and dataset[1]["text"] == "short"
    assert csv.field_size_limit() == 131_072  # the caller's setting is left as it was


@pytest.mark.parametrize("name", ["table.csv", "table.jsonl", "text"])
def test_a_file_that_is_not_utf8_names_its_line(tmp_path, name):
    """A Latin-1 byte deep in a file: the error names the file and the line it is on,
    not a position inside a read buffer."""
    path = tmp_path / name
    rows = [f"u{i} hello {i}" for i in range(50_000)] + ["u_bad caf\xe9"]
    if name.endswith(".csv"):
        rows = ["id,text"] + [row.replace(" ", ",", 1) for row in rows]
    elif name.endswith(".jsonl"):
        rows = [
            json.dumps(dict(zip(("id", "text"), row.split(" ", 1))), ensure_ascii=False)
            for row in rows
        ]
    path.write_bytes("\n".join(rows).encode("latin-1") + b"\n")
    with pytest.raises(ValueError) as info:
        if name == "text":
            ManifestDataset({"text": path})
        else:
            ManifestDataset.from_table(path)
    assert str(info.value).startswith(f"{path} line {len(rows)}: not UTF-8"), info.value


def test_a_header_with_a_nameless_column_names_the_file(tmp_path):
    path = write_lines(tmp_path / "trailing.csv", "id,dur,", "u1,1.5,", "u2,2.0,")
    with pytest.raises(ValueError) as info:
        ManifestDataset.from_table(path, lengths="dur")
    assert str(info.value).startswith(f"{path} line 1: column 3 of the header has no name")
