"""The shared classification head of every network (study.md section 5).

Default (the paper's): global average pooling -> Dense 1024 ReLU -> Dropout 0.3 -> Dense 512 ReLU
-> Dropout 0.3 -> Dense ``n_classes`` -> softmax. The dropouts act in training only; calling the
model with ``training=True`` at test time gives Monte Carlo dropout samples (``cellstudy predict``
and the prediction chapter, 11, draw them through the head).

The last Dense is a separate layer named ``"logits"`` (pre-softmax class scores, what Grad-CAM
eq. 12 differentiates) and the softmax is a separate ``Activation`` named ``"probs"``. Both run in
float32 whatever the global mixed-precision policy, so the output is always float32.
"""
from __future__ import annotations

from collections.abc import Sequence

from keras import layers

from cellstudy.networks import HEAD_DEFAULTS  # noqa: F401  (re-exported: the head's parameters and paper defaults)

POOLINGS = ("avg", "max", "flatten")


def check_head_params(pooling: str, units: Sequence[int], dropout: float) -> None:
    """Raise ValueError for a bad head configuration."""
    if pooling not in POOLINGS:
        raise ValueError(f"head_pooling={pooling!r}; expected one of {POOLINGS}")
    if isinstance(units, int) or not all(isinstance(u, int) and u > 0 for u in units):
        raise ValueError(f"head_units={units!r}; expected a sequence of positive ints, e.g. (1024, 512)")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"head_dropout={dropout!r}; expected a float in [0, 1)")


def classification_head(
    x,
    n_classes: int = 2,
    pooling: str = "avg",
    units: Sequence[int] = (1024, 512),
    dropout: float = 0.3,
    prefix: str = "head",
):
    """Apply the head to a symbolic tensor ``x`` and return the softmax output.

    ``x``: ``(N, h, w, C)`` feature map (pooled with ``pooling``: "avg" = global average pooling,
    "max", or "flatten" = the authors' code), ``(N, T, C)`` tokens (pooled over tokens; "flatten"
    flattens) or ``(N, C)`` an already pooled vector (used as is).
    Returns ``(N, n_classes)`` float32 probabilities (rows sum to 1).
    """
    check_head_params(pooling, units, dropout)
    if int(n_classes) < 2:
        raise ValueError(f"n_classes={n_classes!r}; expected an int >= 2")
    rank = len(x.shape)
    if rank == 4:
        pool = {"avg": layers.GlobalAveragePooling2D, "max": layers.GlobalMaxPooling2D,
                "flatten": layers.Flatten}[pooling]
        x = pool(name=f"{prefix}_pool")(x)
    elif rank == 3:
        pool = {"avg": layers.GlobalAveragePooling1D, "max": layers.GlobalMaxPooling1D,
                "flatten": layers.Flatten}[pooling]
        x = pool(name=f"{prefix}_pool")(x)
    elif rank != 2:
        raise ValueError(f"head input has shape {tuple(x.shape)}; expected a 2-, 3- or 4-D tensor")
    for i, u in enumerate(units, start=1):
        x = layers.Dense(int(u), activation="relu", name=f"{prefix}_dense{i}")(x)
        if dropout > 0:
            x = layers.Dropout(float(dropout), name=f"{prefix}_dropout{i}")(x)
    logits = layers.Dense(int(n_classes), dtype="float32", name="logits")(x)
    return layers.Activation("softmax", dtype="float32", name="probs")(logits)
