"""Evaluation suite: retrieval (short and long texts), zero-shot classification, dense
open-vocabulary segmentation, text diversity and per-branch attention maps, for holistic
(H-branch) and plain (H = 1) CLIP models alike. ``holiclip eval TASK`` dispatches through
:data:`TASKS`; every evaluator takes ``fusion=`` / ``branches=`` as :func:`holiclip.fuse` does.
"""
from .datasets import (
    ClassificationData,
    RetrievalData,
    SegmentationData,
    load_classification,
    load_retrieval,
    load_segmentation,
    load_templates,
    read_clip_benchmark_wds,
    read_coco_captions,
    read_image_folder,
    read_karpathy,
    read_long_captions,
    read_mask_folder,
    read_mask_manifest,
    read_urban1k,
)
from .dense import confusion_matrix, evaluate_segmentation, iou_metrics, patch_logits
from .diversity import slot_similarity, text_diversity
from .explain import explain_image
from .features import TextEncoding, encode_images, encode_texts
from .loading import EvalModel, load_eval_model
from .report import print_rows, write_json
from .retrieval import groups_from_identical_captions, recall_at_k, retrieval_ranks
from .tasks import TASKS, branch_variants, get_task, register_task, run_task
from .zeroshot import build_classifier, classification_metrics, zeroshot_classify

__all__ = [
    "recall_at_k", "retrieval_ranks", "groups_from_identical_captions",
    "encode_images", "encode_texts", "TextEncoding",
    "RetrievalData", "ClassificationData", "SegmentationData", "load_retrieval", "load_segmentation",
    "load_classification", "read_clip_benchmark_wds", "load_templates", "read_coco_captions", "read_karpathy", "read_long_captions", "read_urban1k",
    "read_image_folder", "read_mask_folder", "read_mask_manifest",
    "build_classifier", "classification_metrics", "zeroshot_classify",
    "evaluate_segmentation", "confusion_matrix", "iou_metrics", "patch_logits",
    "slot_similarity", "text_diversity", "explain_image",
    "EvalModel", "load_eval_model", "print_rows", "write_json",
    "TASKS", "register_task", "get_task", "run_task", "branch_variants",
]
