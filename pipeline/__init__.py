"""pipeline: raw text to a pretrained, LoRA-tuned, evaluated model on the Hub, from one YAML recipe.

The package is lazy: ``import pipeline`` (and so ``pipeline --help``) imports neither torch nor transformers. The
Quill classes are imported on first use (``from pipeline import QuillForCausalLM``), and importing them registers
Quill with the transformers Auto classes and PEFT (`pipeline.models.quill`): ``AutoModelForCausalLM.from_pretrained(dir)``
then loads a trained Quill without ``trust_remote_code``. Saved models also carry their code and load with
``trust_remote_code=True`` where this package is not installed.
"""

from typing import Any

__version__ = "0.1.0"

# Quill's public names (`pipeline.models.quill.__all__`; tests/test_model.py keeps the two lists equal).
__all__ = [
    "QuillConfig",
    "QuillForCausalLM",
    "QuillForSequenceClassification",
    "QuillForTokenClassification",
    "QuillModel",
    "QuillPreTrainedModel",
    "__version__",
]
_QUILL_NAMES = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    """PEP 562: a Quill name imports the model code (torch, transformers) and registers it, once."""
    if name in _QUILL_NAMES:
        from pipeline.models import quill

        value = getattr(quill, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_QUILL_NAMES})
