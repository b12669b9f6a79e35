"""Shared Keras plumbing for the XAI functions (private).

Everything here works on any Keras 3 *functional* model with one image input ``(N, H, W, C)`` and
one output that is a softmax over classes. TensorFlow is imported lazily, inside functions, so
``cellstudy.explain.xai`` imports without it (the pure numeric parts: gmean, correlation).

How the pre-softmax class score (the logit) is found
----------------------------------------------------
Starting at ``model.outputs[0]`` the graph is walked backwards through the Keras history of the
output tensor:

1. any trailing ``Activation("linear")`` (e.g. the float32 cast layer that mixed-precision models
   put after the head) is skipped;
2. if the layer reached is a ``Dense`` with ``activation="softmax"``, the logits are
   ``input @ kernel + bias`` of that Dense: a sub-model is built up to the Dense's *input* tensor and
   the kernel / bias are applied explicitly (in float32);
3. if the layer reached is a softmax (``Activation("softmax")`` or ``keras.layers.Softmax``) whose
   input is a ``Dense`` with a linear activation, that Dense's output is the logit tensor.

Anything else raises :class:`NoSoftmaxHeadError`: Grad-CAM's eq. 12 is defined on the class score
*before* the softmax, and silently using probabilities would change the maps.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


class NoSoftmaxHeadError(ValueError):
    """The model does not end in a softmax Dense, so the pre-softmax class score is unknown."""


def _tf():
    import tensorflow as tf  # noqa: PLC0415  (lazy: keep the package importable without TF)

    return tf


def _keras():
    import keras  # noqa: PLC0415

    return keras


def _act_name(layer) -> str | None:
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", None) if act is not None else None


def _history(tensor):
    """(layer, node_index, tensor_index) of a KerasTensor in a functional graph."""
    hist = getattr(tensor, "_keras_history", None)
    if hist is None:
        raise NoSoftmaxHeadError(
            "cannot walk the model graph: its output tensor has no Keras history "
            "(expected a Keras 3 functional model)"
        )
    return hist[0], hist[1], hist[2]


def _node_inputs(layer, node_index) -> list:
    node = layer._inbound_nodes[node_index]
    return list(node.input_tensors)


@dataclass
class Head:
    """Where the logits come from: ``tensor`` (a KerasTensor inside the model) and, when the final
    Dense applies the softmax itself, ``dense`` (its kernel/bias are applied to ``tensor``)."""

    tensor: Any
    dense: Any | None

    def logits(self, value):
        """Logits (B, n_classes) float32 from the value of ``tensor`` (a tf tensor)."""
        tf = _tf()
        value = tf.cast(value, tf.float32)
        if self.dense is None:
            return value
        kernel = tf.cast(self.dense.kernel, tf.float32)
        out = tf.matmul(value, kernel)
        if self.dense.use_bias:
            out = out + tf.cast(self.dense.bias, tf.float32)
        return out


def find_softmax_head(model) -> Head:
    """Locate the pre-softmax logits of ``model`` (see the module docstring). Raises
    :class:`NoSoftmaxHeadError` naming the final layer when the model does not end in a softmax."""
    keras = _keras()
    outputs = list(getattr(model, "outputs", None) or [])
    if len(outputs) != 1:
        raise NoSoftmaxHeadError(
            f"model {getattr(model, 'name', model)!r} has {len(outputs)} outputs; expected a Keras "
            "functional model with exactly one (softmax) output"
        )
    t = outputs[0]
    layer, node_index, _ = _history(t)
    seen = []
    while isinstance(layer, keras.layers.Activation) and _act_name(layer) == "linear":
        seen.append(layer.name)
        t = _node_inputs(layer, node_index)[0]
        layer, node_index, _ = _history(t)
    if isinstance(layer, keras.layers.Dense) and _act_name(layer) == "softmax":
        return Head(tensor=_node_inputs(layer, node_index)[0], dense=layer)
    is_softmax = isinstance(layer, keras.layers.Softmax) or (
        isinstance(layer, keras.layers.Activation) and _act_name(layer) == "softmax"
    )
    if is_softmax:
        t_in = _node_inputs(layer, node_index)[0]
        prev, _, _ = _history(t_in)
        if isinstance(prev, keras.layers.Dense) and _act_name(prev) in ("linear", None):
            return Head(tensor=t_in, dense=None)
        raise NoSoftmaxHeadError(
            f"model {model.name!r}: the softmax layer {layer.name!r} follows "
            f"{type(prev).__name__} {prev.name!r}; expected a Dense with a linear activation there"
        )
    raise NoSoftmaxHeadError(
        f"model {model.name!r} does not end in a softmax Dense: its final layer is "
        f"{type(layer).__name__} {layer.name!r} (activation {_act_name(layer)!r})"
        + (f" after the linear layer(s) {seen}" if seen else "")
        + "; expected Dense(n_classes, activation='softmax'), optionally followed by a linear "
        "(float32) Activation, or Dense(linear) -> softmax"
    )


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------
def input_shape(model) -> tuple:
    inputs = list(getattr(model, "inputs", None) or [])
    if len(inputs) != 1:
        raise ValueError(
            f"model {getattr(model, 'name', model)!r} has {len(inputs)} inputs; the XAI functions "
            "expect a Keras functional model with exactly one image input (N, H, W, C)"
        )
    return tuple(inputs[0].shape[1:])


def check_images(model, images, name: str = "images") -> np.ndarray:
    """``images`` as float32 (N, H, W, C), checked against the model's input shape."""
    x = np.asarray(images)
    expected = input_shape(model)
    if x.ndim != 4:
        hint = f" (a single image: pass {name}[None])" if x.ndim == 3 else ""
        raise ValueError(f"{name} must be a batch (N, H, W, C); got shape {x.shape}{hint}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}); expected at least one image")
    for i, (e, g) in enumerate(zip(expected, x.shape[1:])):
        if e is not None and e != g:
            raise ValueError(
                f"{name} have shape (H, W, C) = {x.shape[1:]} but model "
                f"{getattr(model, 'name', '?')!r} expects {tuple(expected)} (axis {i + 1}: "
                f"expected {e}, given {g})"
            )
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name} must be numeric; got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contain NaN or inf values")
    return x.astype(np.float32, copy=False)


def n_classes(model) -> int:
    return int(model.outputs[0].shape[-1])


def check_class_index(class_index, n: int, n_cls: int, name: str = "class_index") -> np.ndarray:
    """An int or an (N,) int array -> (N,) int32 array in [0, n_cls)."""
    c = np.asarray(class_index)
    if c.ndim == 0:
        c = np.full(n, int(c))
    if c.shape != (n,):
        raise ValueError(f"{name} must be an int or an array of shape ({n},); got shape {c.shape}")
    if not (np.issubdtype(c.dtype, np.integer) or np.all(np.equal(np.mod(c, 1), 0))):
        raise ValueError(f"{name} must hold integer class indices; got {c.dtype}")
    c = c.astype(np.int64)
    if c.size and (c.min() < 0 or c.max() >= n_cls):
        raise ValueError(
            f"{name} holds {sorted(set(c[(c < 0) | (c >= n_cls)].tolist()))}; expected class "
            f"indices in [0, {n_cls})"
        )
    return c.astype(np.int32)


def target_classes(model, x: np.ndarray, class_index, batch_size: int) -> np.ndarray:
    """The class each image is explained for: the model's predicted class when ``class_index``
    is None, else ``class_index`` checked (:func:`check_class_index`). (N,) int32."""
    if class_index is None:
        return predict_proba(model, x, batch_size).argmax(axis=1).astype(np.int32)
    return check_class_index(class_index, len(x), n_classes(model))


# ---------------------------------------------------------------------------------------------
# Batched prediction (probabilities or logits of given classes)
# ---------------------------------------------------------------------------------------------
_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def model_cache(model) -> dict:
    """A per-model dict for compiled helper functions (dropped with the model)."""
    try:
        return _CACHE.setdefault(model, {})
    except TypeError:  # unhashable / not weak-referenceable: no caching
        return {}


def _logit_model(model):
    cache = model_cache(model)
    if "logit_model" not in cache:
        keras = _keras()
        head = find_softmax_head(model)
        cache["logit_model"] = (keras.Model(model.inputs, head.tensor), head)
    return cache["logit_model"]


def image_spec(model):
    """``tf.TensorSpec((None, H, W, C), float32)`` of the model's image input: the compiled XAI
    functions take any batch size under one trace (a second batch size would otherwise trace
    the network again: DenseNet121 at 32 px, ~3 s per trace)."""
    return _tf().TensorSpec((None, *input_shape(model)), _tf().float32)


def class_spec():
    """``tf.TensorSpec((None,), int32)``: per-image class indices of the compiled XAI steps."""
    return _tf().TensorSpec((None,), _tf().int32)


def _compiled_forward(model, output: str):
    """A cached tf.function(x) -> (B, n_classes) float32 probabilities or logits."""
    key = ("forward", output)
    cache = model_cache(model)
    if key not in cache:
        tf = _tf()
        if output == "logit":
            sub, head = _logit_model(model)

            def fwd(x):
                return head.logits(sub(x, training=False))
        else:
            def fwd(x):
                return tf.cast(model(x, training=False), tf.float32)
        cache[key] = tf.function(fwd, input_signature=[image_spec(model)])
    return cache[key]


def _batched_forward(model, images: np.ndarray, output: str, batch_size: int) -> np.ndarray:
    """(N, n_classes) float64; batches padded to one shape so the compiled function traces once."""
    tf = _tf()
    fwd = _compiled_forward(model, output)
    n = len(images)
    bs = min(batch_size, n)
    parts = []
    for s in range(0, n, bs):
        xb = np.asarray(images[s:s + bs], dtype=np.float32)
        m = len(xb)
        if m < bs:
            xb = np.concatenate([xb, np.zeros((bs - m, *xb.shape[1:]), np.float32)])
        parts.append(fwd(tf.constant(xb)).numpy()[:m].astype(np.float64))
    return np.concatenate(parts, axis=0)


def predict_scores(model, images: np.ndarray, class_index: np.ndarray, output: str = "probability",
                   batch_size: int = 64) -> np.ndarray:
    """Score of class ``class_index[i]`` for each image: softmax probability (``"probability"``)
    or pre-softmax logit (``"logit"``). (N,) float64. Inference mode (dropout off)."""
    if output not in ("probability", "logit"):
        raise ValueError(f"output must be 'probability' or 'logit'; got {output!r}")
    check_batch_size(batch_size)
    p = _batched_forward(model, images, output, batch_size)
    return p[np.arange(len(p)), np.asarray(class_index)]


def predict_proba(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Softmax probabilities (N, n_classes) float64, inference mode, batched."""
    check_batch_size(batch_size)
    return _batched_forward(model, images, "probability", batch_size)


def check_batch_size(batch_size) -> int:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    return int(batch_size)


def layer_rank(layer) -> int | None:
    """Rank of a layer's (first-node) output, or None if it cannot be read."""
    try:
        out = layer.output
    except Exception:  # multi-node layers, layers never called
        try:
            out = layer._inbound_nodes[0].output_tensors[0]
        except Exception:
            return None
    if isinstance(out, (list, tuple)):
        return None
    return len(out.shape)


def feature_map_layers(model, rank: int = 4) -> list[str]:
    """Names of the model's (top-level) layers whose output has the given rank, input excluded."""
    keras = _keras()
    return [
        layer.name
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer) and layer_rank(layer) == rank
    ]


def layer_output(model, name: str, rank: int = 4, what: str = "a 4-D feature map (N, h, w, K)"):
    """The output KerasTensor of layer ``name``, checked to have ``rank`` dimensions."""
    if not isinstance(name, str):
        raise ValueError(f"layer must be a layer name (str); got {name!r}")
    names = [layer.name for layer in model.layers]
    if name not in names:
        cands = feature_map_layers(model, rank)
        raise ValueError(
            f"model {model.name!r} has no layer named {name!r}; layers with {rank}-D outputs "
            f"(candidates): {cands[-12:] if len(cands) > 12 else cands}"
            + (f" (last 12 of {len(cands)})" if len(cands) > 12 else "")
        )
    layer = model.get_layer(name)
    try:
        out = layer.output
    except Exception as exc:  # noqa: BLE001
        raise ValueError(
            f"layer {name!r} of model {model.name!r} has no single output tensor ({exc}); it is "
            "probably shared (called more than once): pass the name of a layer called once, e.g. "
            "an Identity/Activation placed after each call"
        ) from exc
    if isinstance(out, (list, tuple)) or len(out.shape) != rank:
        shape = [tuple(o.shape) for o in out] if isinstance(out, (list, tuple)) else tuple(out.shape)
        raise ValueError(
            f"layer {name!r} of model {model.name!r} outputs shape {shape}; expected {what}. "
            f"Candidates: {feature_map_layers(model, rank)[-12:]}"
        )
    return out


def as_sequence(x) -> list:
    if isinstance(x, str):
        return [x]
    if isinstance(x, Sequence):
        return list(x)
    return [x]
