"""Data selection: every mode, every form of ``num``, metadata sources, chains and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from poolloader.datasets import ManifestDataset, select, select_steps

IDS = [f"u{i}" for i in range(10)]
# Metadata in a scrambled order: u3 is the smallest, u7 the largest.
VALUES = [4.0, 6.0, 2.0, 0.5, 9.0, 3.0, 8.0, 12.0, 1.0, 5.0]
META = dict(zip(IDS, VALUES))
BY_VALUE = [key for _, key in sorted(zip(VALUES, IDS))]  # u3 u8 u2 u5 u0 u9 u1 u6 u4 u7


def in_order(keys: list[str]) -> list[str]:
    """The keys in their original (IDS) order, as selections return them."""
    return sorted(keys, key=IDS.index)


def write_lines(path: Path, *lines: str) -> Path:
    """Write a text manifest, one line each."""
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------- order modes


@pytest.mark.parametrize(
    ("num", "count"),
    [(0.3, 3), (0.35, 3), (0.99, 9), (-4, 4), (-10, 10), (-1, 1), (np.int64(-2), 2)],
)
def test_order_and_rev_order_keep_the_first_and_last_items(num, count):
    assert select(IDS, "order", num) == IDS[:count]
    assert select(IDS, "rev_order", num) == IDS[-count:]


def test_a_negative_count_keeps_that_many_it_does_not_remove_them():
    # SpeeChain: "it must be negative (its absolute value will be taken)".
    assert select(IDS, "order", -3) == ["u0", "u1", "u2"]
    assert select(IDS, "rev_order", -3) == ["u7", "u8", "u9"]
    assert select(IDS, "random", -10, seed=5) == IDS


@pytest.mark.parametrize("num", [0, 1, 3, 10])
def test_a_positive_or_zero_integer_is_refused_as_speechain_refuses_it(num):
    # A plain 1 must never be read as "all" (a ratio of 1) nor as one item.
    with pytest.raises(ValueError) as info:
        select(IDS, "order", num)
    assert str(info.value).startswith(f"num={num} is a non-negative integer, but a count is")
    assert (f"num=-{num} keeps {num} items" if num else "num=-k keeps k items") in str(info.value)


def test_random_is_seeded_without_repeats_and_in_original_order():
    picked = select(IDS, "random", -5, seed=3)
    assert len(picked) == 5 == len(set(picked))
    assert picked == in_order(picked)
    assert set(picked) <= set(IDS)


def test_random_is_the_same_for_every_caller_with_one_seed_whatever_the_global_state():
    np.random.seed(1)
    first = select(IDS, "random", 0.5, seed=11)
    np.random.seed(2)
    np.random.random(100)
    assert select(IDS, "random", 0.5, seed=11) == first
    assert any(select(IDS, "random", 0.5, seed=s) != first for s in range(12, 16))


# ---------------------------------------------------------------- meta modes


@pytest.mark.parametrize("num", [-3, 0.3, 0.39])
def test_min_and_max_keep_the_smallest_and_largest(num):
    assert select(IDS, "min", num, meta=META) == in_order(BY_VALUE[:3])
    assert select(IDS, "max", num, meta=META) == in_order(BY_VALUE[-3:])


@pytest.mark.parametrize(
    ("num", "kept"), [(-4, BY_VALUE[3:7]), (0.5, BY_VALUE[2:7]), (-3, BY_VALUE[3:6])]
)
def test_middle_removes_the_largest_and_smallest_keeping_exactly_num(num, kept):
    assert select(IDS, "middle", num, meta=META) == in_order(kept)


def test_thresholds_keep_at_most_for_min_and_at_least_for_max_inclusive():
    assert select(IDS, "min", "3.0", meta=META) == in_order(["u3", "u8", "u2", "u5"])
    assert select(IDS, "max", "8", meta=META) == in_order(["u6", "u4", "u7"])


def test_meta_from_kaldi_files_of_several_corpora(tmp_path):
    first = write_lines(tmp_path / "utt2dur_a", *(f"{k} {v}" for k, v in list(META.items())[:5]))
    second = write_lines(tmp_path / "utt2dur_b", *(f"{k} {v}" for k, v in list(META.items())[5:]))
    assert select(IDS, "max", -2, meta=[first, second]) == in_order(["u4", "u7"])
    assert select(IDS[:5], "min", "2.0", meta=first) == ["u2", "u3"]


def test_selecting_from_a_dataset_returns_a_dataset_and_uses_its_lengths(tmp_path):
    text = write_lines(tmp_path / "text", *(f"{k} word{k}" for k in IDS))
    durations = write_lines(tmp_path / "utt2dur", *(f"{k} {v}" for k, v in META.items()))
    ds = ManifestDataset({"text": text}, lengths=durations, duration=3.0)
    part = select(ds, "max", -2)
    assert isinstance(part, ManifestDataset)
    assert part.ids == ("u4", "u7")
    assert part.lengths.tolist() == [9.0, 12.0]
    assert part["u7"]["text"] == "wordu7" and part.duration == 3.0
    assert select(ds, "order", 0.2).ids == ("u0", "u1")
    other = {k: -v for k, v in META.items()}
    assert select(ds, "max", -1, meta=other).ids == ("u3",)


# ---------------------------------------------------------------- chains


def test_select_steps_applies_each_step_to_what_the_last_one_kept():
    steps = [("rev_order", 0.8), ("random", -5), ("min", "6.0", META)]
    by_hand = select(
        select(select(IDS, "rev_order", 0.8), "random", -5, seed=4), "min", "6.0", META
    )
    assert select_steps(IDS, steps, seed=4) == by_hand
    assert select_steps(IDS, [("order", 0.5), ("rev_order", -2)]) == ["u3", "u4"]


def test_select_steps_on_a_dataset(tmp_path):
    text = write_lines(tmp_path / "text", *(f"{k} w" for k in IDS))
    durations = write_lines(tmp_path / "utt2dur", *(f"{k} {v}" for k, v in META.items()))
    ds = ManifestDataset({"text": text}, lengths=durations)
    part = select_steps(ds, [["order", -6], ["max", -2]])
    assert part.ids == ("u1", "u4")


def test_mixing_corpora_then_selecting_works_on_the_mixed_whole(tmp_path):
    # SpeeChain's example: three corpora mixed into one, then the last 50% selected.
    fields: dict[str, list[Path]] = {"text": [], "spk": []}
    for corpus, count in (("a", 4), ("b", 2), ("c", 4)):
        keys = [f"{corpus}{i}" for i in range(count)]
        fields["text"].append(write_lines(tmp_path / f"{corpus}_text", *(f"{k} t" for k in keys)))
        fields["spk"].append(write_lines(tmp_path / f"{corpus}_spk", *(f"{k} S" for k in keys)))
    ds = ManifestDataset(fields)  # type: ignore[arg-type]
    assert select(ds, "rev_order", 0.5).ids == ("b1", "c0", "c1", "c2", "c3")
    assert select(ds, "order", -5).ids == ("a0", "a1", "a2", "a3", "b0")


def test_select_steps_take_speechain_style_lists_with_metadata_files(tmp_path):
    # data_selection: [[rev_order, 0.8], [min, !str 6.0, utt2dur], [max, -2, utt2dur]]
    durations = write_lines(tmp_path / "utt2dur", *(f"{k} {v}" for k, v in META.items()))
    steps = [["rev_order", 0.8], ["min", "6.0", str(durations)], ["max", -2, durations]]
    # last 8: u2..u9; values <= 6: u2 u3 u5 u8 u9 (2, .5, 3, 1, 5); two largest: u5 (3), u9 (5)
    assert select_steps(IDS, steps) == ["u5", "u9"]
    text = write_lines(tmp_path / "text", *(f"{k} w" for k in IDS))
    assert select_steps(ManifestDataset({"text": text}), steps).ids == ("u5", "u9")


def test_select_steps_refuses_steps_of_the_wrong_shape():
    with pytest.raises(
        ValueError,
        match=r"step 1 should be \(mode, num\) or \(mode, num, meta\), but got \('order',\)",
    ):
        select_steps(IDS, [("order", 0.5), ("order",)])
    with pytest.raises(ValueError, match=r"wrap a single step in a list"):
        select_steps(IDS, ("order", 0.5))  # type: ignore[arg-type]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("num", [0.0, 1.0, 1.5, -0.5])
def test_a_float_must_be_a_ratio_in_the_open_unit_interval(num):
    with pytest.raises(
        ValueError, match=rf"num={num!r} is a float, which means the ratio .* in \(0, 1\)"
    ):
        select(IDS, "order", num)


@pytest.mark.parametrize("mode", ["order", "min"])
def test_a_count_must_not_exceed_the_size(mode):
    with pytest.raises(
        ValueError,
        match=r"num=-11 asks for 11 of the 10 items; a count must be between -10 and -1$",
    ):
        select(IDS, mode, -11, meta=META if mode == "min" else None)


@pytest.mark.parametrize("num", [True, None, [3]])
def test_num_of_another_type_is_refused(num):
    with pytest.raises(TypeError, match=r"num should be a ratio in"):
        select(IDS, "order", num)  # type: ignore[arg-type]


def test_thresholds_only_for_min_and_max_and_only_numbers():
    with pytest.raises(ValueError, match=r"only modes 'min' and 'max' take; mode 'middle'"):
        select(IDS, "middle", "3.0", meta=META)
    with pytest.raises(ValueError, match=r"only modes 'min' and 'max' take; mode 'order'"):
        select(IDS, "order", "3")
    with pytest.raises(ValueError, match=r"num='short' is not a number"):
        select(IDS, "min", "short", meta=META)


def test_unknown_mode_and_meta_where_it_does_not_belong():
    with pytest.raises(
        ValueError,
        match=r"mode should be one of \['order', 'rev_order', 'random', 'min', 'max', 'middle'\], but got mode='first'",
    ):
        select(IDS, "first", 0.5)
    with pytest.raises(ValueError, match=r"mode 'random' selects by position and takes no meta"):
        select(IDS, "random", 0.5, meta=META)


def test_meta_modes_need_metadata_for_every_id(tmp_path):
    with pytest.raises(ValueError, match=r"mode 'min' selects by metadata: pass meta="):
        select(IDS, "min", 0.5)
    partial = {k: META[k] for k in IDS[:7]}
    with pytest.raises(
        ValueError, match=r"the mapping has no value for 3 of the 10 ids: 'u7', 'u8', 'u9'"
    ):
        select(IDS, "max", 0.5, meta=partial)
    bad = write_lines(tmp_path / "utt2dur", "u0 1.0", "u1")
    with pytest.raises(ValueError, match=r"utt2dur line 2: expected 'id value', got 'u1'"):
        select(IDS, "max", 0.5, meta=bad)


def test_a_dataset_without_lengths_needs_meta(tmp_path):
    ds = ManifestDataset({"text": write_lines(tmp_path / "text", "u0 a", "u1 b")})
    with pytest.raises(ValueError, match=r"or select from a dataset that has lengths"):
        select(ds, "middle", -1)


def test_a_selection_that_keeps_nothing_says_so():
    with pytest.raises(
        ValueError, match=r"selection mode='order', num=0.05 keeps none of the 10 items"
    ):
        select(IDS, "order", 0.05)
    with pytest.raises(ValueError, match=r"keeps none of the 10 items"):
        select(IDS, "min", "0.1", meta=META)


def test_ids_must_be_a_collection_of_strings():
    with pytest.raises(TypeError, match=r"select takes a list of ids or a dataset"):
        select("u0 u1", "order", -1)
    with pytest.raises(TypeError, match=r"ids should be strings, but got 3$"):
        select(["u0", 3], "order", -1)  # type: ignore[list-item]
