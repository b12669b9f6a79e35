"""Seeds: every random stream of the study comes from the run's one seed, a purpose and keys.

``stream(seed, purpose, *keys)`` is a ``numpy.random.SeedSequence`` of the entropy
``[seed, *keys, *SALTS[purpose]]``: streams of different purposes or keys are independent, a
stream depends on its own keys only (a resumed run, another fold order or fewer networks draw the
same numbers), and nothing is seeded globally. The salts are the constants the study has always
used, so the streams (and every number of a run) are those of earlier versions. A caveat of that
choice: NumPy's SeedSequence ignores trailing zero words, and several purposes have no salt, so
``augment`` with fold k, ``cohort_cells`` with key k and ``permutation`` with (k, 0, 0) are the same
stream, as ``xai_cells`` (k) is ``permutation`` (k, 8, 0). They serve unrelated draws (image shifts,
feature permutations, cell choices) and never meet in one computation; new purposes get a salt.

| purpose | keys | used for |
|---|---|---|
| ``augment`` | fold | the fold's augmented copies (``augment.fold_seed``) |
| ``shuffle`` | epoch | the training batches' order per epoch (``train.epoch_seed``) |
| ``xai_cells`` | fold | the cells explained per fold (``explain.select_cells``) |
| ``permutation`` | fold, repeat, stain group | the baseline's permutation importance |
| ``cohort_cells`` | crc32 of the field | cells kept per field when a cohort is built (``cohorts``) |
| ``mc_dropout`` | (the fold is in the seed) | the head's dropout masks of Monte Carlo dropout (``predict``) |
| ``pretrain`` | 0 cells, 1 augmentation, 2 weights | backbone pre-training (``learning.pretrain``) |
"""
from __future__ import annotations

import numpy as np

#: Purpose -> the constant entropy words appended after the keys.
SALTS: dict[str, tuple[int, ...]] = {
    "augment": (),
    "shuffle": (0x5EED,),
    "xai_cells": (8,),
    "permutation": (),
    "cohort_cells": (),
    "mc_dropout": (0xD50,),
    "pretrain": (0xB0B,),
}


def stream(seed: int, purpose: str, *keys: int) -> np.random.SeedSequence:
    """The SeedSequence of ``purpose`` for the run ``seed`` and ``keys`` (non-negative ints)."""
    if purpose not in SALTS:
        raise ValueError(f"unknown seed purpose {purpose!r}; expected one of {sorted(SALTS)}")
    words = [int(seed), *(int(k) for k in keys), *SALTS[purpose]]
    if any(w < 0 for w in words):
        raise ValueError(f"seed and keys must be non-negative ints, got seed={seed!r}, keys={keys!r}")
    return np.random.SeedSequence(words)


def rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    """A NumPy Generator on :func:`stream`."""
    return np.random.default_rng(stream(seed, purpose, *keys))


def int_seed(seed: int, purpose: str, *keys: int, bits: int = 32) -> int:
    """One integer seed of ``bits`` (<= 32) bits from :func:`stream`, for APIs that take an int
    (cv2, TensorFlow's dataset shuffle)."""
    v = int(stream(seed, purpose, *keys).generate_state(1)[0])
    return v & ((1 << bits) - 1)
