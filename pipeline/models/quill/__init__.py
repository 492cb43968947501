"""Quill, the pipeline's own transformer. The two modules beside this file are exported with every model.

Importing this package registers Quill with transformers' Auto classes, so ``AutoModelForCausalLM.from_pretrained(dir)``
loads a trained Quill without ``trust_remote_code`` and ``save_pretrained`` writes the model's code beside its weights,
and with PEFT's default target modules, so ``LoraConfig()`` without ``target_modules`` (and the other tuners' configs)
picks the modules it picks for Llama. These registrations are the package's only side effects; `pipeline` itself is
lazy and imports this package on the first use of a Quill name.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

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

_AUTO_CLASSES = {
    AutoModel: QuillModel,
    AutoModelForCausalLM: QuillForCausalLM,
    AutoModelForSequenceClassification: QuillForSequenceClassification,
    AutoModelForTokenClassification: QuillForTokenClassification,
}


def _register_with_transformers() -> None:
    AutoConfig.register(QuillConfig.model_type, QuillConfig, exist_ok=True)
    QuillConfig.register_for_auto_class()
    for auto, model in _AUTO_CLASSES.items():
        auto.register(QuillConfig, model, exist_ok=True)
        model.register_for_auto_class(auto.__name__)


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


_register_with_transformers()
_register_with_peft()
