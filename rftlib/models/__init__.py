"""Models: CLIP loading, zero-shot heads, image classifiers and portable checkpoints."""

from .checkpoint import (
    classifier_state,
    export_open_clip_weights,
    load_checkpoint,
    load_classifier,
    save_checkpoint,
)
from .heads import (
    ImageClassifier,
    SplitAwareClassifier,
    ZeroShotHead,
    build_image_classifier,
    build_zeroshot_head,
    class_prompts,
    encode_class_prompts,
    for_split,
)
from .loading import (
    PROJECT_MODELS,
    ClipModel,
    WeightsRefusedError,
    WeightsUnavailableError,
    get_tokenizer,
    list_models,
    load_clip,
)
from .sidecar import CheckpointMismatchError, CorruptCheckpointError, check_sidecar, read_sidecar

__all__ = [
    "CheckpointMismatchError", "ClipModel", "CorruptCheckpointError", "ImageClassifier", "PROJECT_MODELS",
    "SplitAwareClassifier", "WeightsRefusedError", "WeightsUnavailableError",
    "ZeroShotHead", "build_image_classifier", "build_zeroshot_head", "check_sidecar", "class_prompts",
    "classifier_state", "encode_class_prompts", "export_open_clip_weights", "for_split", "get_tokenizer", "list_models",
    "load_checkpoint", "load_classifier", "load_clip", "read_sidecar", "save_checkpoint",
]
