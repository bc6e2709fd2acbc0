"""Stratified splits: deterministic, disjoint, stratified, hashed, saved."""

from __future__ import annotations

import numpy as np
import pytest

from cifarlab.split import load_split, save_split, stratified_split

LABELS = np.repeat(np.arange(10), 5000)  # the real training set's class counts


def test_same_seed_same_split_and_hash():
    a = stratified_split(LABELS, 40_000, 10_000, seed=1)
    b = stratified_split(LABELS, 40_000, 10_000, seed=1)
    assert np.array_equal(a.train_idx, b.train_idx) and np.array_equal(a.val_idx, b.val_idx)
    assert a.digest == b.digest


def test_other_seed_or_sizes_change_the_hash():
    base = stratified_split(LABELS, 40_000, 10_000, seed=1)
    assert stratified_split(LABELS, 40_000, 10_000, seed=2).digest != base.digest
    assert stratified_split(LABELS, 42_000, 8_000, seed=1).digest != base.digest


@pytest.mark.parametrize(
    "train,val", [(40_000, 10_000), (36_000, 10_000), (42_000, 8_000), (45_000, 5_000), (997, 103)]
)
def test_disjoint_exact_sizes_and_stratified(train, val):
    split = stratified_split(LABELS, train, val, seed=0)
    assert len(split.train_idx) == train and len(split.val_idx) == val
    assert not set(split.train_idx) & set(split.val_idx)
    for part, size in ((split.train_idx, train), (split.val_idx, val)):
        counts = np.bincount(LABELS[part], minlength=10)
        assert counts.max() - counts.min() <= 1, counts  # each class keeps its share
        assert counts.sum() == size


def test_unbalanced_labels_keep_their_proportions():
    labels = np.concatenate([np.zeros(900, int), np.ones(100, int)])
    split = stratified_split(labels, 500, 200, seed=0)
    assert np.bincount(labels[split.val_idx]).tolist() == [180, 20]
    assert np.bincount(labels[split.train_idx]).tolist() == [450, 50]


@pytest.mark.parametrize(
    "train,val,match", [(0, 10, "train_size"), (10, 0, "val_size"), (45_000, 6_000, "exceeds")]
)
def test_bad_sizes_are_named(train, val, match):
    with pytest.raises(ValueError, match=match):
        stratified_split(LABELS, train, val, seed=0)


def test_saved_split_round_trips_and_detects_tampering(tmp_path):
    split = stratified_split(LABELS, 1000, 200, seed=3)
    folder = save_split(split, tmp_path, data_fingerprint="abc")
    assert split.digest[:12] in folder.name
    again = load_split(folder)
    assert again.digest == split.digest
    tampered = split.train_idx.copy()
    tampered[0] = split.val_idx[0]
    np.save(folder / "train_idx.npy", tampered)
    with pytest.raises(ValueError, match="hash"):
        load_split(folder)
