"""The recipe: one YAML file that says what the pipeline builds, checked completely before anything runs.

A recipe is a tree of typed sections (`pipeline.recipe.schema`, pydantic models; each knob is documented where it
is declared, and `recipe_json_schema` publishes them for editors: ``recipes/recipe.schema.json``). `load_recipe`
reads the YAML, applies ``KEY.SUB=VALUE`` command-line overrides, converts every value to its declared type,
checks values and cross-field constraints, fills the defaults that refer to other sections, checks the files it
names, and returns a `Recipe`. Every problem is reported at once in one `RecipeError`, each with its key path
(``pretrain.learning_rate``), what was expected, what was found and the fix.

YAML rules. The recipe loader is PyYAML's safe loader with the YAML 1.1 surprises removed:

* Numbers follow YAML 1.2: ``1e-4`` is the float 0.0001 (plain PyYAML: the string '1e-4'); ``042`` is the
  decimal 42 (plain PyYAML: octal 34); hex and octal need ``0x``/``0o``; ``1:30`` is a string (PyYAML: 90,
  base 60). Dates stay strings. ``_`` between digits is allowed (``1_000``).
* A repeated key is an error (PyYAML silently keeps the last one).
* ``yes/no/on/off/true/false`` are booleans, as in PyYAML. A choice field whose options include ``"no"``
  reads a false there as ``"no"`` (``mixed_precision: no``); a true there is an error.
* An int field takes a float only when it is integral (``max_steps: 1e5``); ``2.5`` is an error. Number
  fields also take numeric strings (``'1e-4'``, which plain ``yaml.safe_load`` produces). A string field
  never takes a number or a boolean: quote it (``revision: '0123'``).

Relative paths (``output_dir``, local data sources, a local tokenizer, model or checkpoint) are resolved
against the current working directory when the recipe is loaded, as every command-line tool does, and ``~``
is expanded: the returned recipe holds absolute paths, so stages may change directory freely.
"""

from pipeline.recipe.loader import (
    RecipeError,
    dump_recipe,
    from_dict,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    section_hash,
)
from pipeline.recipe.schema import (
    DataSection,
    EvaluateSection,
    FinetuneSection,
    GenerationSection,
    HubSection,
    LoraSection,
    ModelSection,
    PretrainSection,
    Recipe,
    SourceSection,
    TokenizerSection,
    TrainSection,
    recipe_json_schema,
)

__all__ = [
    "DataSection",
    "EvaluateSection",
    "FinetuneSection",
    "GenerationSection",
    "HubSection",
    "LoraSection",
    "ModelSection",
    "PretrainSection",
    "Recipe",
    "RecipeError",
    "SourceSection",
    "TokenizerSection",
    "TrainSection",
    "dump_recipe",
    "from_dict",
    "load_recipe",
    "recipe_from_dict",
    "recipe_json_schema",
    "recipe_to_dict",
    "section_hash",
]
