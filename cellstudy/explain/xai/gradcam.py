"""Grad-CAM (paper eq. 12-13) for Keras 3 functional models, batched.

For a class ``c`` with pre-softmax score ``y^c`` (the logit, see :mod:`cellstudy.explain.xai._keras` for
how it is located) and a layer with feature maps ``A^k`` (k = 1..K, each h x w):

* eq. 12: ``alpha_k^c = 1/(h w) sum_ij dy^c / dA^k_ij`` (global-average-pooled gradients);
* eq. 13: ``L^c = ReLU(sum_k alpha_k^c A^k)`` (an h x w map),

then ``L^c`` is bilinearly upsampled to the input size H x W (``tf.image.resize``, half-pixel
centres) and scaled per map to [0, 1] by min-max; a map whose range is below 1e-6 of its maximum
(constant, e.g. all zero after the ReLU) becomes all zeros. Several layers of one cell (the RGB
family's R, G and B maps, DenRes-131's two backbones; :func:`gradcam_multi`) are scaled by ONE
common maximum, the cell's largest value over all of them, so their relative strength is kept;
their ``combined`` map is the mean of the raw maps, min-max scaled once.

The authors' variant (:func:`gradcam_authors`, or ``gradcam(..., variant="authors")``): their
code differentiates the softmax *probability* ``p^c`` instead of the class score ``y^c`` (eq. 12
with ``dp^c / dA^k_ij``), otherwise the same pooling, ReLU, upsampling and scaling; with two
classes ``dp^c/dA = p^c (1 - p^c) d(y^c - y^c')/dA``, which vanishes for confident cells. It is
provided to show that difference (the reproducibility chapter), not for the study's maps.

Default layers (:func:`default_layers`): ``cellstudy.learning.models.gradcam_layers(model,
min_size=...)``, the deepest layer of each backbone whose map is at least ``min_size`` x
``min_size`` (the scale's ``gradcam_min_size``; :data:`DEFAULT_MIN_SIZE` = 4 when not given; None:
the last conv map), so a map has spatial resolution at every image size.

Batching: one forward and one backward pass per batch. The gradient of the *sum* of the batch's
class scores is taken; the model runs in inference mode (``training=False``: dropout off,
batch-norm on its moving statistics), so images do not interact and the per-image gradients are
exact. Several layers are served by the same pass (:func:`gradcam_multi`). The compiled step is
cached per model and layer set, and the last batch is padded to ``batch_size``, so a call traces at
most once.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from cellstudy.explain.xai import _keras as K

#: Default batch size for Grad-CAM.
BATCH_SIZE = 32
#: Default smallest Grad-CAM map side (the scales' ``gradcam_min_size``; study.md section 12).
DEFAULT_MIN_SIZE = 4


def normalize_maps(maps: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """Min-max scale each map of ``maps`` (N, H, W) to [0, 1], float32. Maps whose range
    (max - min) is <= ``rtol * max|map|`` (constant maps, all-zero maps) become zeros."""
    m = np.asarray(maps, dtype=np.float64)
    if m.ndim != 3:
        raise ValueError(f"maps must be (N, H, W); got shape {m.shape}")
    lo = m.min(axis=(1, 2), keepdims=True)
    hi = m.max(axis=(1, 2), keepdims=True)
    rng = hi - lo
    scale = np.maximum(np.abs(hi), np.abs(lo))
    ok = rng > rtol * scale
    out = np.where(ok, (m - lo) / np.where(ok, rng, 1.0), 0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def default_layers(model, min_size: int | None = DEFAULT_MIN_SIZE) -> list[str]:
    """The Grad-CAM layers of ``model``: ``cellstudy.learning.models.gradcam_layers(model,
    min_size=min_size)`` when the model registry is importable and knows the model, else the last
    layer with a 4-D output whose map is at least ``min_size`` x ``min_size`` (the last 4-D layer
    when none is, or when ``min_size`` is None; a warning says why when the registry was
    importable but failed)."""
    try:
        from cellstudy.learning.models import gradcam_layers  # noqa: PLC0415  (lazy: registry is optional)
    except (ImportError, AttributeError):
        gradcam_layers = None
    if gradcam_layers is not None:
        try:
            names = list(gradcam_layers(model, min_size=min_size))
            if names:
                return names
            reason = "it returned no layers"
        except (ValueError, KeyError, TypeError, LookupError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"cellstudy.learning.models.gradcam_layers({model.name!r}) failed ({reason}); using the last "
            "4-D layer instead",
            stacklevel=3,
        )
    cands = K.feature_map_layers(model, 4)
    if not cands:
        raise ValueError(
            f"model {model.name!r} has no layer with a 4-D (N, h, w, K) output to take Grad-CAM "
            "at; for token layers (N, T, D), e.g. a ViT, use gradcam_tokens"
        )
    if min_size is not None:
        def side_ok(n):
            shape = model.get_layer(n).output.shape[1:3]
            return all(v is not None and int(v) >= int(min_size) for v in shape)
        big = [n for n in cands if side_ok(n)]
        if big:
            return [big[-1]]
    return [cands[-1]]


def map_size(model, layer: str) -> tuple[int, int]:
    """``(h, w)`` of the 4-D feature map of ``layer`` (ValueError like :func:`gradcam`)."""
    t = K.layer_output(model, layer, 4)
    return int(t.shape[1]), int(t.shape[2])


def common_scale(maps: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Scale several (N, H, W) maps of the same cells by ONE maximum per cell (over all maps and
    pixels) to [0, 1], float32: the maps' relative strength is kept (an R map ten times the G map
    stays ten times it; no per-map minimum is subtracted). A cell whose maps are all <= 0 gets
    zeros. Negative values (none after eq. 13's ReLU) are clipped to 0."""
    ms = [np.asarray(m, dtype=np.float64) for m in maps]
    if not ms:
        raise ValueError("maps is empty; expected at least one (N, H, W) array")
    for m in ms:
        if m.ndim != 3 or m.shape != ms[0].shape:
            raise ValueError(f"maps must be (N, H, W) arrays of one shape; got {[x.shape for x in ms]}")
    top = np.max(np.stack([m.max(axis=(1, 2)) for m in ms]), axis=0)[:, None, None]
    ok = top > 0
    return [np.clip(np.where(ok, m / np.where(ok, top, 1.0), 0.0), 0.0, 1.0).astype(np.float32)
            for m in ms]


def _build_step(model, layers: tuple, token_grids: tuple | None = None):
    """A cached tf.function(x, cls) -> list of raw (B, H, W) upsampled ReLU maps, one per layer.

    ``token_grids``: for token layers, per layer ``(drop_first, gh, gw)``; None for 4-D layers."""
    key = ("gradcam", layers, token_grids)
    cache = K.model_cache(model)
    if key in cache:
        return cache[key]
    tf, keras = K._tf(), K._keras()
    head = K.find_softmax_head(model)
    if token_grids is None:
        feats = [K.layer_output(model, name, 4) for name in layers]
    else:
        feats = [
            K.layer_output(model, name, 3, "a token sequence (N, T, D)") for name in layers
        ]
    grad_model = keras.Model(model.inputs, [*feats, head.tensor])
    H, W = K.input_shape(model)[:2]

    @tf.function(input_signature=[K.image_spec(model), K.class_spec()])
    def step(x, cls):
        with tf.GradientTape() as tape:
            outs = grad_model(x, training=False)
            maps, pre = list(outs[:-1]), outs[-1]
            logits = head.logits(pre)
            score = tf.reduce_sum(tf.gather(logits, cls, axis=1, batch_dims=1))
        grads = tape.gradient(score, maps)
        cams = []
        for i, (a, g) in enumerate(zip(maps, grads)):
            a = tf.cast(a, tf.float32)
            g = tf.cast(g, tf.float32)
            if token_grids is not None:
                drop_first, gh, gw = token_grids[i]
                if drop_first:
                    a, g = a[:, 1:], g[:, 1:]
                a = tf.reshape(a, (-1, gh, gw, a.shape[-1]))
                g = tf.reshape(g, (-1, gh, gw, g.shape[-1]))
            alpha = tf.reduce_mean(g, axis=(1, 2), keepdims=True)  # eq. 12
            cam = tf.nn.relu(tf.reduce_sum(alpha * a, axis=-1))  # eq. 13
            cam = tf.image.resize(cam[..., None], (H, W), method="bilinear")[..., 0]
            cams.append(cam)
        return cams

    cache[key] = step
    return step


def _inputs(model, images, class_index, batch_size) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The checked images, the class of each (``class_index``, or the predicted class when None),
    the batch size and the number of images."""
    x = K.check_images(model, images)
    batch_size = K.check_batch_size(batch_size)
    n = len(x)
    cls = K.target_classes(model, x, class_index, batch_size)
    return x, cls, batch_size, n


def _run(model, images, class_index, layers, batch_size, token_grids=None) -> list[np.ndarray]:
    tf = K._tf()
    x, cls, batch_size, n = _inputs(model, images, class_index, batch_size)
    step = _build_step(model, tuple(layers), token_grids)
    out = [np.empty((n, *x.shape[1:3]), np.float32) for _ in layers]
    bs = min(batch_size, n)
    for s in range(0, n, bs):
        xb, cb = x[s:s + bs], cls[s:s + bs]
        m = len(xb)
        if m < bs:  # pad so the compiled step keeps one input shape
            xb = np.concatenate([xb, np.zeros((bs - m, *xb.shape[1:]), xb.dtype)])
            cb = np.concatenate([cb, np.zeros(bs - m, cb.dtype)])
        cams = step(tf.constant(xb), tf.constant(cb))
        for o, c in zip(out, cams):
            o[s:s + m] = c.numpy()[:m]
    return out


def gradcam_multi(model, images, class_index, layers: Sequence[str] | str | None = None,
                  batch_size: int = BATCH_SIZE, normalize: bool = True,
                  combine: Sequence[str] | None = None,
                  min_size: int | None = DEFAULT_MIN_SIZE) -> dict[str, np.ndarray]:
    """Grad-CAM maps at several layers from one forward/backward pass per batch.

    Parameters
    ----------
    model : a Keras 3 functional model, one image input, ending in a softmax Dense.
    images : (N, H, W, C) float array, the model's input size.
    class_index : int, (N,) int array, or None (each image's predicted class).
    layers : layer names (4-D outputs), or None for :func:`default_layers` (with ``min_size``).
    normalize : scale the per-layer maps to [0, 1] by one common maximum per cell
        (:func:`common_scale`: the largest value of that cell over all ``layers``, so an R map of
        strength 50 and a G map of strength 1e-4 keep their ratio); False returns the upsampled
        ReLU maps of eq. 13 in the units of the logit times the activations.
    combine : the layers averaged into ``combined`` (default: all ``layers``), e.g. only those
        with a spatial map.

    Returns
    -------
    dict: layer name -> (N, H, W) float32 maps, plus ``"combined"``: the mean of the *raw*
    per-layer maps of ``combine``, min-max scaled once to [0, 1] (:func:`normalize_maps`; used for
    the RGB family's R/G/B maps and DenRes's two backbones).
    """
    layers = default_layers(model, min_size) if layers is None else K.as_sequence(layers)
    if not layers:
        raise ValueError("layers is empty; expected at least one layer name")
    if "combined" in layers:
        raise ValueError("'combined' is reserved for the combined map; rename that layer")
    combine = list(layers) if combine is None else K.as_sequence(combine)
    bad = [c for c in combine if c not in layers]
    if bad or not combine:
        raise ValueError(f"combine={combine!r}: expected a non-empty subset of layers {list(layers)}")
    raw = _run(model, images, class_index, layers, batch_size)
    scaled = common_scale(raw) if normalize else raw
    result = {name: m for name, m in zip(layers, scaled)}
    result["combined"] = normalize_maps(np.mean([raw[layers.index(c)] for c in combine], axis=0))
    return result


#: Grad-CAM variants: ``"paper"`` (eq. 12-13, the class score before the softmax) and
#: ``"authors"`` (the authors' code: the softmax probability; :func:`gradcam_authors`).
VARIANTS = ("paper", "authors")


def _build_authors_step(model, layer: str):
    """A cached function(x, cls) -> (raw (B, H, W) upsampled ReLU maps, (B, n_classes)
    probabilities, (B,) max |dp_c/dA|) for the softmax-probability variant at one 4-D layer.

    It runs eagerly (not a tf.function): the variant is a one-off demonstration on a few cells,
    and eager execution gives the same float32 values as a plain ``tf.GradientTape`` over the
    model (a compiled graph may fuse operations and differ in the last bits)."""
    key = ("gradcam_authors", layer)
    cache = K.model_cache(model)
    if key in cache:
        return cache[key]
    tf, keras = K._tf(), K._keras()
    K.find_softmax_head(model)  # the same check as the paper's variant: a softmax output
    feat = K.layer_output(model, layer, 4)
    sub = keras.Model(model.inputs, [feat, model.outputs[0]])
    H, W = K.input_shape(model)[:2]

    def step(x, cls):
        with tf.GradientTape() as tape:
            a, prob = sub(x, training=False)
            score = tf.reduce_sum(tf.gather(prob, cls, axis=1, batch_dims=1))  # sum_n p_{c_n}
        g = tape.gradient(score, a)
        w = tf.reduce_mean(g, axis=(1, 2), keepdims=True)  # eq. 12 with dp^c/dA
        cam = tf.nn.relu(tf.reduce_sum(w * a, axis=-1))[..., None]  # eq. 13
        cam = tf.image.resize(cam, (H, W), method="bilinear")[..., 0]
        gmax = tf.reduce_max(tf.abs(tf.reshape(g, (tf.shape(g)[0], -1))), axis=1)
        return cam, tf.cast(prob, tf.float32), gmax

    cache[key] = step
    return step


def gradcam_authors(model, images, class_index, layer: str, batch_size: int = BATCH_SIZE,
                    normalize: bool = True) -> dict[str, np.ndarray]:
    """Grad-CAM as the authors' code computes it: the gradient of the softmax probability.

    Eq. 12-13 with ``p^c`` (the model's softmax output for class ``c``) in place of the class
    score ``y^c``: ``alpha_k = 1/(h w) sum_ij dp^c/dA^k_ij``, ``L = ReLU(sum_k alpha_k A^k)``,
    bilinearly upsampled to the input's H x W and, with ``normalize``, min-max scaled per map to
    [0, 1] (:func:`normalize_maps`). For two classes ``dp^c/dA = p^c (1 - p^c) d(y^c - y^c')/dA``:
    the map of a confidently classified cell (p^c -> 1) is scaled towards zero. The authors also
    took it at intermediate layers (``block4_pool``, ``conv5_block3_1_bn``, ...): pass the layer.
    One eager forward and backward pass per batch of ``batch_size`` (not compiled: the values are
    those of a plain ``tf.GradientTape`` over the model).

    Parameters
    ----------
    model : a Keras 3 functional model ending in a softmax (as for :func:`gradcam`).
    images : (N, H, W, C) float array, the model's input size.
    class_index : int, (N,) int array, or None (each image's predicted class).
    layer : one layer name with a 4-D output (N, h, w, K).

    Returns
    -------
    dict with ``"maps"``: (N, H, W) float32 (in [0, 1] with ``normalize``, else the raw upsampled
    ReLU maps in units of probability times activation); ``"proba"``: (N, n_classes) float32, the
    softmax output of the same forward pass; ``"max_abs_grad"``: (N,) float32, the largest
    ``|dp^c/dA^k_ij|`` of each image over the layer's positions and channels.
    """
    tf = K._tf()
    if not isinstance(layer, str):
        raise ValueError(f"layer must be one layer name (str) with a 4-D output; got {layer!r}")
    x, cls, batch_size, n = _inputs(model, images, class_index, batch_size)
    step = _build_authors_step(model, layer)
    maps = np.empty((n, *x.shape[1:3]), np.float32)
    proba = np.empty((n, K.n_classes(model)), np.float32)
    gmax = np.empty(n, np.float32)
    for s in range(0, n, batch_size):
        cam, p, g = step(tf.constant(x[s:s + batch_size]), tf.constant(cls[s:s + batch_size]))
        maps[s:s + batch_size], proba[s:s + batch_size], gmax[s:s + batch_size] = cam.numpy(), p.numpy(), g.numpy()
    return {"maps": normalize_maps(maps) if normalize else maps, "proba": proba, "max_abs_grad": gmax}


def gradcam(model, images, class_index, layer: str | Sequence[str] | None = None,
            batch_size: int = BATCH_SIZE, normalize: bool = True,
            min_size: int | None = DEFAULT_MIN_SIZE, variant: str = "paper") -> np.ndarray:
    """Grad-CAM (eq. 12-13) of ``class_index`` at ``layer``: (N, H, W) float32 in [0, 1].

    ``layer``: a layer name with a 4-D output (N, h, w, K); None -> the model's Grad-CAM layers
    (:func:`default_layers` with ``min_size``: ``cellstudy.learning.models.gradcam_layers``, else the last
    4-D layer of at least ``min_size``); a list of names (or None resolving to several) returns
    the ``"combined"`` map of :func:`gradcam_multi`. ``class_index``: int, (N,) ints, or None for
    the predicted class. ``normalize=False`` returns the raw upsampled ReLU map (single layer only).

    Errors (ValueError): unknown layer (the message lists the 4-D candidates), a layer that is not
    a 4-D feature map, images of the wrong size (expected vs given), class indices out of range, a
    model that does not end in a softmax Dense (:class:`NoSoftmaxHeadError`), an unknown
    ``variant``.

    ``variant``: ``"paper"`` (eq. 12-13: the gradient of the class score before the softmax) or
    ``"authors"`` (the gradient of the softmax probability, as the authors' code computes it;
    single layer only; :func:`gradcam_authors`, which also returns the probabilities and the
    gradients' size).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; expected one of {VARIANTS}")
    layers = default_layers(model, min_size) if layer is None else K.as_sequence(layer)
    if variant == "authors":
        if len(layers) != 1:
            raise ValueError(f"variant='authors' needs a single layer; got {layers}")
        return gradcam_authors(model, images, class_index, layers[0], batch_size, normalize)["maps"]
    if len(layers) == 1:
        raw = _run(model, images, class_index, layers, batch_size)[0]
        return normalize_maps(raw) if normalize else raw
    if not normalize:
        raise ValueError(f"normalize=False needs a single layer; got {layers}")
    return gradcam_multi(model, images, class_index, layers, batch_size)["combined"]


def _token_grid(n_tokens: int, grid) -> tuple[bool, int, int]:
    if grid is None:
        for drop in (False, True):
            t = n_tokens - int(drop)
            g = int(round(np.sqrt(t)))
            if g * g == t and t > 0:
                return drop, g, g
        raise ValueError(
            f"cannot infer a square patch grid from {n_tokens} tokens (nor {n_tokens - 1} without "
            "a class token); pass grid=(rows, cols)"
        )
    gh, gw = (int(grid), int(grid)) if np.isscalar(grid) else (int(grid[0]), int(grid[1]))
    if gh * gw == n_tokens:
        return False, gh, gw
    if gh * gw == n_tokens - 1:
        return True, gh, gw
    raise ValueError(
        f"grid {(gh, gw)} has {gh * gw} patches but the layer has {n_tokens} tokens; expected "
        f"{gh * gw} (no class token) or {gh * gw + 1} (a class token first)"
    )


def gradcam_tokens(model, images, class_index, layer: str, grid=None,
                   batch_size: int = BATCH_SIZE, normalize: bool = True) -> np.ndarray:
    """Grad-CAM over a token layer (ViT): (N, H, W) float32 in [0, 1].

    The layer's output (N, T, D) is read as feature maps on the patch grid: the D channels play the
    role of the K feature maps of eq. 12-13 and the patch tokens are the spatial positions. A class
    token, if present, is dropped: with ``grid=(gh, gw)``, T must be gh*gw (no class token) or
    gh*gw + 1 (class token first); with ``grid=None`` a square grid is inferred from T or T - 1.
    Typically ``layer`` is the last encoder block's output (or the LayerNorm after it).

    Why Grad-CAM rather than attention rollout. Rollout (Abnar & Zuidema 2020; see
    :func:`cellstudy.explain.xai.attention_rollout`) multiplies the head-averaged attention matrices (plus
    the identity for the residuals) through the blocks: it is class-agnostic (the same map for
    "normal" and "abnormal"), it needs the attention weights, which Keras' MultiHeadAttention does
    not expose in a functional graph unless the model was built to return them, and it tracks
    where information flows, not what the decision depends on. Grad-CAM on tokens is
    class-specific, uses the same eq. 12-13 as every CNN in the study (so Gmean-GradCam and the
    correlation images are comparable across networks), and costs one forward/backward pass.
    Its weakness: the last block's tokens are already globally mixed, so maps are coarse
    (one value per patch) and can be diffuse.
    """
    if not isinstance(layer, str):
        raise ValueError(f"layer must be one token layer name (str); got {layer!r}")
    t = K.layer_output(model, layer, 3, "a token sequence (N, T, D)")
    n_tokens = t.shape[1]
    if n_tokens is None:
        raise ValueError(f"layer {layer!r} has an unknown number of tokens; pass a fixed input size")
    spec = _token_grid(int(n_tokens), grid)
    raw = _run(model, images, class_index, [layer], batch_size, token_grids=(spec,))[0]
    return normalize_maps(raw) if normalize else raw


def attention_rollout(attentions, drop_class_token: bool = True, grid=None) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020) from a ViT's attention weights.

    ``attentions``: a list over blocks (first to last) of (N, heads, T, T) arrays (rows: queries,
    sum to 1), e.g. from a model built to return MultiHeadAttention scores. Per block the heads are
    averaged, the identity is added for the residual path and rows are renormalised:
    ``A_l = (mean_h attn + I) / 2``; the rollout is ``A_L @ ... @ A_1``. The map of each image is
    the class token's row (``drop_class_token=True``: token 0 is the class token, its row over the
    patch tokens 1..T-1) or, without a class token, the mean row (the attention every token
    receives). Returns (N, gh, gw) scaled to [0, 1] (min-max, constant -> zeros). Class-agnostic:
    see :func:`gradcam_tokens` for why Grad-CAM is the default.
    """
    if not attentions:
        raise ValueError("attentions is empty; expected one (N, heads, T, T) array per block")
    roll = None
    for i, a in enumerate(attentions):
        a = np.asarray(a, dtype=np.float64)
        if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"attentions[{i}] has shape {a.shape}; expected (N, heads, T, T)")
        if roll is not None and (a.shape[0] != roll.shape[0] or a.shape[-1] != roll.shape[-1]):
            raise ValueError(f"attentions[{i}] shape {a.shape} does not match block 0")
        m = a.mean(axis=1) + np.eye(a.shape[-1])[None]
        m = m / m.sum(axis=-1, keepdims=True)
        roll = m if roll is None else m @ roll
    if drop_class_token:
        rel = roll[:, 0, 1:]
    else:
        rel = roll.mean(axis=1)
    drop, gh, gw = _token_grid(rel.shape[1], grid)
    if drop:
        raise ValueError(f"grid {grid} does not match {rel.shape[1]} patch tokens")
    return normalize_maps(rel.reshape(-1, gh, gw))
