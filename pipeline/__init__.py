"""pipeline: raw text to a pretrained, LoRA-tuned, evaluated model on the Hub, from one YAML recipe.

Importing the package registers Quill with the transformers Auto classes (the package's only side effect), so
``AutoModelForCausalLM.from_pretrained(dir)`` loads a trained Quill without ``trust_remote_code``. Saved models also
carry their code and load with ``trust_remote_code=True`` where this package is not installed.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .models.quill import (
    QuillConfig,
    QuillForCausalLM,
    QuillForSequenceClassification,
    QuillForTokenClassification,
    QuillModel,
)

__version__ = "0.1.0"

_AUTO_CLASSES = {
    AutoModel: QuillModel,
    AutoModelForCausalLM: QuillForCausalLM,
    AutoModelForSequenceClassification: QuillForSequenceClassification,
    AutoModelForTokenClassification: QuillForTokenClassification,
}

AutoConfig.register(QuillConfig.model_type, QuillConfig, exist_ok=True)
QuillConfig.register_for_auto_class()
for _auto, _model in _AUTO_CLASSES.items():
    _auto.register(QuillConfig, _model, exist_ok=True)
    _model.register_for_auto_class(_auto.__name__)

__all__ = [
    "QuillConfig",
    "QuillForCausalLM",
    "QuillForSequenceClassification",
    "QuillForTokenClassification",
    "QuillModel",
    "__version__",
]
