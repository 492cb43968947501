"""Quill, the pipeline's own transformer. The two modules beside this file are exported with every model."""

from .configuration_quill import QuillConfig
from .modeling_quill import (
    QuillForCausalLM,
    QuillForSequenceClassification,
    QuillForTokenClassification,
    QuillModel,
    QuillPreTrainedModel,
)

__all__ = [
    "QuillConfig",
    "QuillForCausalLM",
    "QuillForSequenceClassification",
    "QuillForTokenClassification",
    "QuillModel",
    "QuillPreTrainedModel",
]
