"""pipeline: raw text to a pretrained, LoRA-tuned, evaluated model on the Hub, from one YAML recipe.

Importing the package registers Quill with the transformers Auto classes, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads a trained Quill without ``trust_remote_code``, and with PEFT's
default target modules, so ``LoraConfig()`` without ``target_modules`` (and the other tuners' configs) picks the modules
it picks for Llama. These registrations are the package's only side effects. Saved models also carry their code and
load with ``trust_remote_code=True`` where this package is not installed.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .models import quill
from .models.quill import (
    QuillConfig,
    QuillForCausalLM,
    QuillForSequenceClassification,
    QuillForTokenClassification,
    QuillModel,
    QuillPreTrainedModel,  # noqa: F401  (exported: listed in quill.__all__)
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


def _register_with_peft() -> None:
    """Give Quill the default target modules PEFT has for Llama, whose module names Quill shares (q_proj ... down_proj,
    input_layernorm, norm). PEFT has no registration API: its tuners look the model type up in dicts named
    ``TRANSFORMERS_MODELS_TO_<TUNER>_TARGET_MODULES_MAPPING`` (and IA3's ``..._FEEDFORWARD_MODULES_MAPPING``) in
    ``peft.utils.constants``, imported by reference into the tuners, so adding the key in place reaches them all. Which
    dicts exist differs between PEFT versions (0.17 has a dozen, 0.21 many more), hence the scan instead of a list."""
    try:
        from peft.utils import constants
    except ImportError:  # PEFT is a dependency, but the Auto-class registration above must not hinge on it
        return
    for name, mapping in vars(constants).items():
        if name.startswith("TRANSFORMERS_MODELS_TO_") and name.endswith("_MAPPING") and isinstance(mapping, dict):
            if "llama" in mapping and QuillConfig.model_type not in mapping:
                llama = mapping["llama"]
                mapping[QuillConfig.model_type] = list(llama) if isinstance(llama, (list, tuple)) else llama


_register_with_peft()

__all__ = [*quill.__all__, "__version__"]
