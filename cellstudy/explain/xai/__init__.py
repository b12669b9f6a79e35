"""Explainability (study.md section 8; paper 3.3, eq. 12-16, Figs 9-13) and faithfulness checks.

Model-based functions take any Keras 3 functional model with one image input that ends in a softmax
Dense (see :mod:`cellstudy.explain.xai._keras` for how the pre-softmax score is found). TensorFlow is only
imported when a model-based function runs.
"""
from cellstudy.explain.xai._keras import NoSoftmaxHeadError, find_softmax_head
from cellstudy.explain.xai.attributions import attribution_map, integrated_gradients, occlusion
from cellstudy.explain.xai.channels import bootstrap_ci, channel_importance
from cellstudy.explain.xai.correlation import correlation_ratios, local_correlation
from cellstudy.explain.xai.faithfulness import Faithfulness, deletion_insertion
from cellstudy.explain.xai.gmean import gmean
from cellstudy.explain.xai.gradcam import (attention_rollout, default_layers, gradcam, gradcam_authors, gradcam_multi,
                      gradcam_tokens, normalize_maps)

__all__ = [
    "NoSoftmaxHeadError", "find_softmax_head", "gradcam", "gradcam_authors", "gradcam_multi",
    "gradcam_tokens",
    "attention_rollout", "default_layers", "normalize_maps", "gmean", "local_correlation",
    "correlation_ratios", "integrated_gradients", "occlusion", "attribution_map",
    "deletion_insertion", "Faithfulness", "channel_importance", "bootstrap_ci",
]
