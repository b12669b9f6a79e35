"""Seed streams (cellstudy.seeds): one helper, independent streams, the study's historical values."""
import numpy as np
import pytest

from cellstudy.learning import augment, train
from cellstudy import seeds


def test_streams_are_the_historical_ones():
    # the entropy words each purpose always used, so that no number of a run changes
    assert augment.fold_seed(3, 2) == int(np.random.SeedSequence([3, 2]).generate_state(1)[0])
    assert train.epoch_seed(0, 7) == int(np.random.SeedSequence([0, 7, 0x5EED]).generate_state(1)[0]) & 0x7FFFFFFF
    assert seeds.rng(1, "xai_cells", 4).random() == np.random.default_rng([1, 4, 8]).random()
    assert seeds.rng(0, "permutation", 1, 2, 3).random() == np.random.default_rng([0, 1, 2, 3]).random()


def test_streams_are_independent_and_repeat():
    a = seeds.rng(0, "xai_cells", 1).random(4)
    assert np.array_equal(a, seeds.rng(0, "xai_cells", 1).random(4))
    assert not np.array_equal(a, seeds.rng(0, "xai_cells", 2).random(4))
    assert not np.array_equal(a, seeds.rng(1, "xai_cells", 1).random(4))
    assert not np.array_equal(a, seeds.rng(0, "augment", 1).random(4))
    assert 0 <= seeds.int_seed(0, "shuffle", 1, bits=31) < 2 ** 31


def test_bad_purpose_or_key():
    with pytest.raises(ValueError, match="unknown seed purpose 'shufle'"):
        seeds.stream(0, "shufle")
    with pytest.raises(ValueError, match="non-negative"):
        seeds.stream(0, "augment", -1)
