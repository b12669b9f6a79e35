"""Attributions beyond the paper (its stated future work): Integrated Gradients and occlusion."""
from __future__ import annotations

import numpy as np

from cellstudy.explain.xai import _keras as K


def _fill_array(fill, shape_c: int, name: str = "fill") -> np.ndarray:
    f = np.asarray(fill, dtype=np.float32)
    if f.ndim == 0:
        f = np.full(shape_c, float(f), np.float32)
    if f.shape != (shape_c,) or not np.all(np.isfinite(f)):
        raise ValueError(f"{name} must be a finite scalar or a ({shape_c},) per-channel array; got {fill!r}")
    return f


def _ig_step(model):
    key = ("ig",)
    cache = K.model_cache(model)
    if key in cache:
        return cache[key]
    tf, keras = K._tf(), K._keras()
    head = K.find_softmax_head(model)
    sub = keras.Model(model.inputs, head.tensor)

    @tf.function(input_signature=[K.image_spec(model), K.class_spec()])
    def grads(x, cls):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = head.logits(sub(x, training=False))
            score = tf.reduce_sum(tf.gather(logits, cls, axis=1, batch_dims=1))
        return tape.gradient(score, x)

    cache[key] = grads
    return grads


def integrated_gradients(model, images, class_index, baseline=None, steps: int = 32,
                         batch_size: int = 64) -> np.ndarray:
    """Integrated Gradients (Sundararajan et al. 2017) of the pre-softmax class score.

    ``IG_i(x) = (x_i - x0_i) * mean_k dF/dx_i (x0 + a_k (x - x0))`` with the midpoint rule
    ``a_k = (k + 1/2) / steps``, k = 0..steps-1, where F is the logit of class ``class_index``
    (the same score as Grad-CAM). Completeness: the attributions of an image sum to about
    ``F(x) - F(x0)`` (error O(1/steps^2) for smooth F).

    Parameters: ``images`` (N, H, W, C); ``class_index`` int, (N,) ints or None (predicted);
    ``baseline``: None (zeros: with whitened inputs, the training mean), a scalar, a (C,)
    per-channel value, or an (H, W, C) / (N, H, W, C) array; ``steps`` >= 1; ``batch_size``:
    interpolated images per gradient call.

    Returns (N, H, W, C) float32 attributions in logit units; reduce with
    :func:`attribution_map` for a (N, H, W) saliency map.
    """
    tf = K._tf()
    x = K.check_images(model, images)
    batch_size = K.check_batch_size(batch_size)
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}")
    n, C = len(x), x.shape[-1]
    cls = K.target_classes(model, x, class_index, batch_size)
    if baseline is None:
        x0 = np.zeros_like(x)
    else:
        b = np.asarray(baseline, dtype=np.float32)
        if b.ndim <= 1:
            b = np.broadcast_to(_fill_array(b, C, "baseline"), x.shape)
        elif b.shape == x.shape[1:]:
            b = np.broadcast_to(b, x.shape)
        elif b.shape != x.shape:
            raise ValueError(
                f"baseline has shape {b.shape}; expected a scalar, ({C},), {x.shape[1:]} or {x.shape}"
            )
        x0 = np.ascontiguousarray(b)
    alphas = ((np.arange(steps) + 0.5) / steps).astype(np.float32)
    grad_fn = _ig_step(model)
    out = np.empty_like(x)
    # all (image, alpha) pairs, batched; padded to batch_size so the compiled step traces once
    pairs = np.stack(np.meshgrid(np.arange(n), np.arange(steps), indexing="ij"), -1).reshape(-1, 2)
    acc = np.zeros_like(x, dtype=np.float64)
    bs = min(batch_size, len(pairs))
    for s in range(0, len(pairs), bs):
        p = pairs[s:s + bs]
        m = len(p)
        i, k = p[:, 0], p[:, 1]
        xb = x0[i] + alphas[k][:, None, None, None] * (x[i] - x0[i])
        cb = cls[i]
        if m < bs:
            xb = np.concatenate([xb, np.zeros((bs - m, *xb.shape[1:]), xb.dtype)])
            cb = np.concatenate([cb, np.zeros(bs - m, cb.dtype)])
        g = grad_fn(tf.constant(xb), tf.constant(cb)).numpy()[:m]
        np.add.at(acc, i, g)
    out[...] = (x - x0) * (acc / steps)
    return out


def attribution_map(attributions, mode: str = "abs_sum") -> np.ndarray:
    """Reduce (N, H, W, C) attributions to a (N, H, W) map: ``"abs_sum"`` (sum over channels of
    |a|), ``"sum"`` (signed sum) or ``"positive"`` (sum, negatives clipped to 0)."""
    a = np.asarray(attributions, dtype=np.float64)
    if a.ndim != 4:
        raise ValueError(f"attributions must be (N, H, W, C); got shape {a.shape}")
    if mode == "abs_sum":
        return np.abs(a).sum(-1)
    if mode == "sum":
        return a.sum(-1)
    if mode == "positive":
        return np.clip(a.sum(-1), 0, None)
    raise ValueError(f"mode must be 'abs_sum', 'sum' or 'positive'; got {mode!r}")


def occlusion(model, images, class_index, patch: int | tuple = 8, stride: int | tuple | None = None,
              fill=0.0, output: str = "probability", batch_size: int = 64) -> np.ndarray:
    """Occlusion sensitivity (Zeiler & Fergus 2014): (N, H, W) float32.

    A ``patch`` (int or (ph, pw) pixels) is slid over each image with ``stride`` (default: patch
    // 2, at least 1); at each position the patch (all channels) is set to ``fill`` (a scalar or a
    (C,) per-channel value; 0 = the training mean for whitened inputs) and the drop of the class
    score, ``score(x) - score(x occluded)``, is recorded. ``output``: ``"probability"`` (softmax
    of the class, default) or ``"logit"``. Each pixel's value is the mean drop over the positions
    whose patch covers it (pixels never covered, possible when the stride exceeds the patch, get 0).
    Positive = the region supports the class. Cost: N x positions forward passes, batched.
    """
    x = K.check_images(model, images)
    batch_size = K.check_batch_size(batch_size)
    n, H, W, C = x.shape
    ph, pw = (patch, patch) if np.isscalar(patch) else tuple(patch)
    if stride is None:
        sh, sw = max(1, ph // 2), max(1, pw // 2)
    else:
        sh, sw = (stride, stride) if np.isscalar(stride) else tuple(stride)
    for nm, v in (("patch", ph), ("patch", pw), ("stride", sh), ("stride", sw)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{nm} sizes must be positive ints; got {v!r}")
    if ph > H or pw > W:
        raise ValueError(f"patch {(ph, pw)} is larger than the images {(H, W)}")
    f = _fill_array(fill, C)
    cls = K.target_classes(model, x, class_index, batch_size)
    rows = list(range(0, H - ph + 1, sh))
    cols = list(range(0, W - pw + 1, sw))
    if rows[-1] != H - ph:
        rows.append(H - ph)  # cover the bottom / right border too
    if cols[-1] != W - pw:
        cols.append(W - pw)
    pos = [(r, c) for r in rows for c in cols]
    base = K.predict_scores(model, x, cls, output, batch_size)
    out = np.zeros((n, H, W), np.float64)
    count = np.zeros((H, W), np.float64)
    for r, c in pos:
        count[r:r + ph, c:c + pw] += 1
    # all (image, position) pairs in batches
    pairs = [(i, p) for i in range(n) for p in range(len(pos))]
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        xb = np.empty((len(chunk), H, W, C), np.float32)
        for j, (i, p) in enumerate(chunk):
            r, c = pos[p]
            xb[j] = x[i]
            xb[j, r:r + ph, c:c + pw, :] = f
        idx = np.array([i for i, _ in chunk])
        sc = K.predict_scores(model, xb, cls[idx], output, batch_size)
        for j, (i, p) in enumerate(chunk):
            r, c = pos[p]
            out[i, r:r + ph, c:c + pw] += base[i] - sc[j]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 0, out / np.maximum(count, 1), 0.0)
    return out.astype(np.float32)
