"""Activation records: interleaved splits, disjoint explain/score sets, grouping of lake rows."""

from __future__ import annotations

import random

import pytest

from neuron_pipeline.config import RecordsSettings
from neuron_pipeline.interp.records import (
    ActivationRecord,
    NeuronId,
    NeuronRecord,
    interleaved_splits,
    neuron_records_from_rows,
    split_records,
)
from neuron_pipeline.lake.io import table_frame


def rec(rank: int, kind: str = "top") -> ActivationRecord:
    """A record whose sequence_id encodes its rank (top: rank, random: 1000 + rank)."""
    offset = 0 if kind == "top" else 1000
    return ActivationRecord(("tok",), (float(100 - rank),), offset + rank)


def neuron(n_top: int, n_random: int) -> NeuronRecord:
    return NeuronRecord(
        NeuronId(0, 0),
        top=[rec(i) for i in range(n_top)],
        random=[rec(i, "random") for i in range(n_random)],
    )


def ids(records) -> list[int]:
    return [r.sequence_id for r in records]


# ------------------------------------------------------------------------- ActivationRecord


def test_activation_record_checks_lengths_and_max():
    with pytest.raises(ValueError):
        ActivationRecord(("a", "b"), (1.0,))
    assert ActivationRecord(("a", "b"), (-3.0, -1.0)).max_activation == -1.0
    assert ActivationRecord((), ()).max_activation == 0.0


# ---------------------------------------------------------------------- interleaved splits


def test_interleaved_splits_by_hand():
    assert interleaved_splits(list(range(10)), 3) == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert interleaved_splits("abcd", 2) == [["a", "c"], ["b", "d"]]
    assert interleaved_splits([], 2) == [[], []]


@pytest.mark.parametrize(("n_items", "n_splits"), [(20, 4), (23, 4), (7, 2), (5, 5), (3, 6)])
def test_item_i_goes_to_split_i_mod_n(n_items, n_splits):
    splits = interleaved_splits(list(range(n_items)), n_splits)
    assert len(splits) == n_splits
    for index, split in enumerate(splits):
        assert all(i % n_splits == index for i in split)
        assert split == sorted(split)  # rank order kept within a split
    assert sorted(i for split in splits for i in split) == list(range(n_items))


# ---------------------------------------------------------------------------- split_records


def test_paper_split_of_twenty_top_records():
    splits = split_records(neuron(20, 20), explain_top=5, score_top=5, score_random=5)
    assert ids(splits.explain) == [0, 4, 8, 12, 16]
    assert ids(splits.score_top) == [1, 5, 9, 13, 17]
    assert sorted(ids(splits.holdout_top)) == [2, 3, 6, 7, 10, 11, 14, 15, 18, 19]
    assert len(splits.score_random) == 5
    assert all(i >= 1000 for i in ids(splits.score_random))
    assert len(splits.holdout_random) == 15


@pytest.mark.parametrize(
    ("n_top", "n_random", "explain_top", "score_top", "score_random"),
    [(20, 20, 5, 5, 5), (20, 50, 5, 5, 5), (10, 5, 5, 5, 5), (23, 7, 5, 5, 3), (30, 20, 3, 4, 5), (7, 2, 5, 5, 5), (1, 0, 5, 5, 5)],
)
def test_splits_are_disjoint_and_sized(n_top, n_random, explain_top, score_top, score_random):
    splits = split_records(neuron(n_top, n_random), explain_top, score_top, score_random)
    explain, score_top_ids = set(ids(splits.explain)), set(ids(splits.score_top))
    assert not explain & score_top_ids, "the scorer must never see what the explainer saw"
    assert not explain & set(ids(splits.holdout_top))
    assert not score_top_ids & set(ids(splits.holdout_top))
    assert not set(ids(splits.score_random)) & set(ids(splits.holdout_random))
    assert len(splits.explain) <= explain_top and len(splits.score_top) <= score_top
    assert len(splits.score_random) == min(score_random, n_random)
    if n_top >= explain_top + score_top:
        assert len(splits.explain) == explain_top
        assert len(splits.score_top) == score_top
    # Every record has exactly one use.
    all_top = ids(splits.explain) + ids(splits.score_top) + ids(splits.holdout_top)
    assert sorted(all_top) == list(range(n_top))
    all_random = ids(splits.score_random) + ids(splits.holdout_random)
    assert sorted(all_random) == [1000 + i for i in range(n_random)]
    # The explainer sees the very top record; the best scored record is the next one.
    assert ids(splits.explain)[0] == 0
    if n_top > 1:
        assert ids(splits.score_top)[0] == 1


def test_more_scored_than_explained_excerpts():
    # 30 records, splits sized for the larger of 3 and 4: 30 // 4 = 7 splits.
    splits = split_records(neuron(30, 20), explain_top=3, score_top=4, score_random=5)
    assert ids(splits.explain) == [0, 7, 14]
    assert ids(splits.score_top) == [1, 8, 15, 22]
    assert len(splits.holdout_top) == 23


def test_uneven_split_with_few_records_tops_up_from_unseen_records():
    # 10 records, explain 3, score 7 (allowed: 10 >= 3 + 7). Two splits: [0,2,4,6,8], [1,3,5,7,9].
    # The explainer sees 0, 2, 4; the scorer gets split 1 plus the unseen 6 and 8.
    splits = split_records(neuron(10, 5), explain_top=3, score_top=7, score_random=5)
    assert ids(splits.explain) == [0, 2, 4]
    assert ids(splits.score_top) == [1, 3, 5, 6, 7, 8, 9]
    assert splits.holdout_top == []


def test_explain_set_spans_the_whole_top_range():
    splits = split_records(neuron(20, 20), 5, 5, 5)
    # Interleaving, not the first five: the explainer also sees weaker top excerpts.
    assert max(ids(splits.explain)) == 16


@pytest.mark.parametrize(("top_k", "explain_top", "score_top"), [(20, 5, 5), (30, 3, 4), (40, 5, 8), (10, 5, 5)])
def test_split_count_matches_settings(top_k, explain_top, score_top):
    settings = RecordsSettings(top_k=top_k, explain_top=explain_top, score_top=score_top)
    splits = split_records(neuron(settings.top_k, settings.random_k), settings.explain_top, settings.score_top, settings.score_random)
    assert len(splits.explain) == explain_top and len(splits.score_top) == score_top
    # split 1 of the settings' top_splits interleaved splits is what gets scored
    n = settings.top_splits
    assert ids(splits.score_top) == list(range(1, top_k, n))[:score_top]
    assert ids(splits.explain) == list(range(0, top_k, n))[:explain_top]


def test_random_split_is_deterministic():
    a = split_records(neuron(20, 20), 5, 5, 5)
    b = split_records(neuron(20, 20), 5, 5, 5)
    assert ids(a.score_random) == ids(b.score_random)
    assert ids(a.explain) == ids(b.explain)


# ------------------------------------------------------------------ rows from the lake


def row(layer, neuron_index, kind, rank, quantile_bin=None, seq=None, acts=(1.0,)):
    return {
        "model": "m",
        "layer": str(layer),
        "neuron": neuron_index,
        "kind": kind,
        "rank": rank,
        "quantile_bin": quantile_bin,
        "sequence_id": seq if seq is not None else rank,
        "tokens": ["t"] * len(acts),
        "activations": list(acts),
        "max_activation": max(acts),
    }


def test_neuron_records_from_rows_groups_and_orders():
    rows = []
    for rank in range(4):
        rows.append(row(3, 7, "top", rank, seq=100 + rank, acts=(4.0 - rank, 0.5)))
        rows.append(row(3, 7, "random", rank, seq=200 + rank))
        rows.append(row(3, 8, "top", rank, seq=300 + rank))
    for bin_index in (2, 0, 1):
        for rank in (1, 0):
            rows.append(row(3, 7, "quantile", rank, quantile_bin=bin_index, seq=1000 + 10 * bin_index + rank))
    rows.append(row(5, 7, "top", 0, seq=999))
    random.Random(3).shuffle(rows)

    grouped = neuron_records_from_rows(rows)
    assert set(grouped) == {NeuronId(3, 7), NeuronId(3, 8), NeuronId(5, 7)}
    n = grouped[NeuronId(3, 7)]
    assert n.neuron == NeuronId(3, 7)
    assert ids(n.top) == [100, 101, 102, 103]
    assert n.top[0].activations == (4.0, 0.5) and n.top[0].tokens == ("t", "t")
    assert ids(n.random) == [200, 201, 202, 203]
    assert list(n.quantile) == [0, 1, 2]
    assert {b: ids(v) for b, v in n.quantile.items()} == {0: [1000, 1001], 1: [1010, 1011], 2: [1020, 1021]}
    other = grouped[NeuronId(3, 8)]
    assert ids(other.top) == [300, 301, 302, 303]
    assert other.random == [] and other.quantile == {}
    assert ids(grouped[NeuronId(5, 7)].top) == [999]


def test_neuron_records_from_typed_lake_frame():
    rows = [row(0, 1, "top", 1, seq=11, acts=(0.25, 2.0)), row(0, 1, "top", 0, seq=10), row(0, 1, "quantile", 0, 4, 40)]
    frame = table_frame("activation_records", rows)
    grouped = neuron_records_from_rows(frame.iter_rows(named=True))
    record = grouped[NeuronId(0, 1)]
    assert ids(record.top) == [10, 11]
    assert record.top[1].activations == (0.25, 2.0)
    assert all(isinstance(a, float) for a in record.top[1].activations)
    assert ids(record.quantile[4]) == [40]


def test_neuron_records_from_no_rows():
    assert neuron_records_from_rows([]) == {}


def test_record_chunks_read_only_the_kinds_asked_for(tmp_path):
    from neuron_pipeline.assets.layered import record_chunks
    from neuron_pipeline.lake import write_table

    def row(neuron, kind, rank, value):
        return {"model": "m", "layer": "0", "neuron": neuron, "kind": kind, "rank": rank,
                "quantile_bin": 0 if kind == "quantile" else None, "sequence_id": rank,
                "tokens": ["a", "b"], "activations": [value, 0.0], "max_activation": value}  # fmt: skip

    rows = [row(n, kind, rank, float(10 - rank)) for n in range(3) for kind in ("top", "random", "quantile") for rank in range(4)]
    write_table(tmp_path, "activation_records", rows, replace_where={"layer": "0"})
    both = {n: r for chunk in record_chunks(tmp_path, 0, [0, 1, 2], chunk=2) for n, r in chunk.items()}
    top = {n: r for chunk in record_chunks(tmp_path, 0, [0, 2], kinds=("top",)) for n, r in chunk.items()}
    assert sorted(both) == [0, 1, 2] and sorted(top) == [0, 2]
    # The default (explaining and simulating): top and random in rank order, no quantile rows.
    assert [r.activations[0] for r in both[1].top] == [10.0, 9.0, 8.0, 7.0] and len(both[1].random) == 4
    assert both[1].quantile == {}
    assert len(top[2].top) == 4 and top[2].random == [] and top[2].quantile == {}
    # The records a plain explainer sees are the same whichever kinds were read.
    assert split_records(top[2], 2, 2, 2).explain == split_records(both[2], 2, 2, 2).explain
