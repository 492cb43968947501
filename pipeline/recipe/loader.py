"""Loading a recipe: YAML and overrides in, a validated and resolved `Recipe` out, or every problem at once.

pydantic converts and checks each section (`pipeline.recipe.schema`); this module words its errors for people
(key path, what was expected, what was found, the fix), applies ``KEY.SUB=VALUE`` overrides, fills the defaults
that refer to other sections, checks what spans sections or depends on this machine, and writes and hashes
recipes.
"""

from __future__ import annotations

import copy
import functools
import glob
import hashlib
import json
import os
import re
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from pipeline.recipe import yaml12
from pipeline.recipe.schema import Meta, Problem, Recipe, SourceSection, TrainSection, choices, suggest


MAX_LISTED = 50
"""Problems a `RecipeError` spells out; the rest are counted (a generated recipe can hold a million typos)."""
MAX_RECIPE_BYTES = 1_000_000
"""A recipe is a few KB: a bigger file is refused before it is parsed (PyYAML takes seconds per MB)."""


class RecipeError(ValueError):
    """A recipe that cannot run. ``problems`` holds every (key path, message) found (past the first `MAX_LISTED`
    the messages are short); str() lists the first `MAX_LISTED` and counts the rest."""

    def __init__(self, problems: Sequence[Problem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        count = len(self.problems)
        lines = [f"Invalid recipe{f' {source}' if source else ''} ({count} problem{'s' * (count != 1)}):"]
        lines += [f"  - {path or '<recipe>'}: {message}" for path, message in self.problems[:MAX_LISTED]]
        if count > MAX_LISTED:
            rest = count - MAX_LISTED
            lines.append(f"  … and {rest} more problem{'s' * (rest != 1)} (fix these first, then run again)")
        super().__init__("\n".join(lines))


# ------------------------------------------------------------------------------------------ public API


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply ``KEY.SUB=VALUE`` overrides and return it validated and resolved.

    Raises `RecipeError` listing every problem (a missing file, invalid YAML, wrong types or values, missing data
    files) before anything is created on disk.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        problem = f"recipe file not found (relative paths start at the current directory {Path.cwd()}). Fix: check the path."
        raise RecipeError([("", problem)], source=str(path))
    return _build(_parse(path), overrides, source=str(path))


def recipe_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Recipe:
    """Like `load_recipe`, for a recipe already parsed into a mapping (e.g. `recipe_to_dict` output)."""
    return _build(data, overrides, source=None)


def from_dict(cls: type[BaseModel], data: Any, path: str = "") -> Any:
    """Convert ``data`` to ``cls`` (a section), type-checking every field and running its checks.

    ``path`` prefixes the key paths in error messages. Cross-section defaults are not resolved: use
    `recipe_from_dict` for a whole recipe.
    """
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        raise RecipeError(_translate(error, cls, path)) from None


def recipe_to_dict(recipe: BaseModel, *, secrets: bool = False) -> dict[str, Any]:
    """The resolved recipe (or a section) as plain YAML/JSON data; paths become strings.

    Secrets (``hub.token``) come out as None unless ``secrets=True``, so printed and dumped recipes never leak them.
    """
    return _to_plain(recipe, for_hash=False, secrets=secrets)


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML (without secrets) to ``path``, atomically; it loads back unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.dump(recipe_to_dict(recipe), Dumper=yaml12.RecipeDumper, sort_keys=False, allow_unicode=True)
    header = "# Resolved recipe (every default filled in). Re-run it with: pipeline run <this file>\n"
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(header + body, encoding="utf-8")
    os.replace(partial, path)  # readers never see half a file


def section_hash(recipe: Recipe, *sections: str) -> str:
    """sha256 of the named resolved sections (dotted paths such as ``"finetune.lora"``; none: the whole recipe).

    A stage stores it with its artefact and skips itself on a rerun when it matches. Knobs that cannot change
    the artefact (logging and checkpoint cadence, trackers, resume, num_proc, the token) are left out. Include
    ``"seed"`` for stages whose result depends on it.
    """
    resolved = _to_plain(recipe, for_hash=True, secrets=False)
    payload = {name: _lookup(resolved, name) for name in sections} if sections else resolved
    blob = json.dumps({"version": _HASH_VERSION, "sections": payload}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


_HASH_VERSION = 1  # bump when the meaning of a hashed field changes, so old artefacts are rebuilt
# finetune.train lost its `enabled` switch (it was always on); hashing it as before keeps finished stages current.
_LEGACY_HASHED = {TrainSection: {"enabled": True}}

# ------------------------------------------------------------------------------------------ building


def _parse(path: Path) -> Any:
    """The YAML of a recipe file, bounded: too large, not UTF-8 or not YAML is a `RecipeError` naming the file."""
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError([("", (
            f"is {size:,} bytes; a recipe is a few KB (the limit is {MAX_RECIPE_BYTES:,}), so this is not one (a data "
            "file?). Fix: point at the recipe YAML; put data in files that data.sources names."
        ))], source=str(path))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise RecipeError([("", (
            f"is not UTF-8 text: byte offset {error.start} (line {line}) holds 0x{raw[error.start]:02x}. Fix: save the "
            "file as UTF-8."
        ))], source=str(path)) from None
    try:
        return yaml12.load(text)
    except yaml.YAMLError as error:
        raise RecipeError([("", f"is not valid YAML: {error}")], source=str(path)) from None


def _build(data: Any, overrides: Sequence[str], source: str | None) -> Recipe:
    if data is None:
        raise RecipeError([("", "is empty. Fix: give at least output_dir and data.sources.")], source)
    if not isinstance(data, Mapping):
        raise RecipeError([("", f"must be a mapping of sections, got {_describe(data)}.")], source)
    raw = copy.deepcopy(dict(data))
    problems: list[Problem] = []
    for override in [overrides] if isinstance(overrides, str) else overrides:
        _apply_override(raw, override, problems)
    pruned: list[str] = []
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as error:
        problems += _translate(error, Recipe)
        recipe, pruned, more = _salvage(raw, error)
        problems += [problem for problem in more if problem not in problems]
        if recipe is None:
            raise RecipeError(problems, source) from None
    _resolve(recipe)
    later = [*_cross_section_problems(recipe), *_environment_problems(recipe)]
    problems += [(key, message) for key, message in later if not any(_within(key, path) for path in pruned)]
    if problems:
        raise RecipeError(problems, source)
    return recipe


def _salvage(raw: dict[str, Any], error: ValidationError) -> tuple[Recipe | None, list[str], list[Problem]]:
    """The recipe with the values that failed their own checks left out (defaults instead), their key paths, and
    the rules between fields that those values hid (a section with an unknown key never reached its own rules), so
    that every check reports in the same run; None after a wrong type."""
    errors = error.errors(include_url=False)
    if any(e["type"] not in _SOFT for e in errors):
        return None, [], []
    pruned, paths, values = copy.deepcopy(raw), [], []
    try:
        for detail in sorted(errors, key=lambda e: e["loc"], reverse=True):  # later list items first: indices hold
            if detail["type"] != "recipe_problems":  # a section's own rules: reported, and its values are fine
                *parents, last = detail["loc"]
                node = pruned
                for step in parents:
                    node = node[step]
                del node[last]
                paths.append(_dotted(detail["loc"]))
                if detail["type"] != "extra_forbidden":
                    values.append(_dotted(tuple(parents)))
        try:
            return Recipe.model_validate(pruned), paths, []
        except ValidationError as rules:  # only section rules can fail now: what is left has the right types
            # A rule over a section whose own value was replaced by its default would judge a value nobody wrote.
            hidden = [(key, message) for key, message in _translate(rules, Recipe)
                      if not any(key.rpartition(".")[0] == section for section in values)]
        return Recipe.model_validate(pruned, context={"skip_section_rules": True}), paths, hidden
    except (LookupError, TypeError, ValidationError):  # e.g. a required value was left out
        return None, [], []


def _within(key: str, path: str) -> bool:
    return key == path or key.startswith((f"{path}.", f"{path}["))


def _resolve(recipe: Recipe) -> None:
    """Fill the defaults that refer to other sections and make local paths absolute. Idempotent."""
    recipe.output_dir = _absolute(recipe.output_dir)
    if recipe.tokenizer.path is None and recipe.tokenizer.sources is None:
        recipe.tokenizer.sources = copy.deepcopy(recipe.data.sources)
    finetune = recipe.finetune
    if finetune.data is None:  # always filled: evaluation and the hub read it even when fine-tuning is off
        finetune.data = copy.deepcopy(recipe.data)
    if recipe.runs("finetune") and finetune.base is None and not recipe.runs("pretrain"):
        finetune.base = recipe.model.path
    for section, name in ((recipe.tokenizer, "path"), (recipe.model, "path"), (finetune, "base")):
        location = getattr(section, name)
        if location is not None and Path(location).expanduser().exists():
            setattr(section, name, str(_absolute(location)))
    for train in (recipe.pretrain, finetune.train):
        if train.resume not in ("auto", "never"):
            train.resume = str(_absolute(train.resume))
    for _, source in _all_sources(recipe):
        source.name = _resolve_source_name(source.name)


def _cross_section_problems(recipe: Recipe) -> Iterator[Problem]:
    model, finetune = recipe.model, recipe.finetune
    trains = (("pretrain", "data", recipe.pretrain, recipe.data), ("finetune", "finetune.data", finetune.train, finetune.data))
    if model.attn_implementation == "flash_attention_2":
        for stage, data_key, train, data in trains:
            key = "pretrain" if stage == "pretrain" else "finetune.train"
            if recipe.runs(stage) and train.mixed_precision == "no":
                yield f"{key}.mixed_precision", (
                    "is 'no' but flash_attention_2 runs only in bf16/fp16. Fix: set mixed_precision: bf16, or use sdpa."
                )
            if data is not None and data.document_masking and train.batch_size > 1:
                yield f"{data_key}.document_masking", (
                    "with flash_attention_2 separates packed documents only at batch_size 1 (transformers reads "
                    "document starts from position_ids for a single row). Fix: use sdpa, or batch_size: 1."
                )
    if model.path is None:  # our own model: its position table limits the sequence length
        limit = model.max_position_embeddings
        blocks = [("data.block_size", recipe.data.block_size)]
        if recipe.runs("finetune") and finetune.base is None:
            blocks.append(("finetune.data.block_size", finetune.data.block_size))
        for key, size in blocks:
            if size > limit:
                yield key, (
                    f"({size}) exceeds model.max_position_embeddings ({limit}). Fix: lower {key} or raise "
                    "model.max_position_embeddings."
                )
    if recipe.runs("finetune") and finetune.base is None and not recipe.runs("pretrain"):
        yield "finetune.base", (
            "is not set and there is nothing to fine-tune (pretrain is disabled and model.path is empty). Fix: set "
            "finetune.base to a model folder or Hub id, set model.path, enable pretrain, or set finetune.enabled: false."
        )
    if recipe.runs("finetune") and finetune.task != "causal_lm" and finetune.data.streaming:
        yield "finetune.data.streaming", (
            f"is true but task {finetune.task!r} reads its examples in memory. Fix: set finetune.data.streaming: "
            "false (streaming is for task causal_lm)."
        )
    yield from _evaluate_task_problems(recipe)
    if recipe.runs("evaluate") and not (recipe.runs("pretrain") or recipe.runs("finetune") or model.path):
        yield "evaluate.enabled", (
            "is true but no model is trained or given. Fix: set model.path, enable pretrain or finetune, or set "
            "evaluate.enabled: false."
        )


def _evaluate_task_problems(recipe: Recipe) -> Iterator[Problem]:
    """The evaluation's tasks need what fine-tuning provides (the stage checks the same, later: a safety net)."""
    if not recipe.runs("evaluate"):
        return
    finetune, tasks, tuning = recipe.finetune, recipe.evaluate.tasks, recipe.runs("finetune")
    prompted_lm = finetune.task == "causal_lm" and finetune.prompt_template is not None
    if "generation" in tasks and finetune.task != "instruction" and not prompted_lm:
        yield "evaluate.tasks", (
            "lists 'generation', which scores prompt -> response rows of the fine-tuning data, but finetune.task is "
            f"{finetune.task!r} without a finetune.prompt_template. Fix: set finetune.prompt_template (and "
            "finetune.label_column, the response column) for a causal LM, use finetune.task: instruction, or remove "
            "'generation' (evaluate.generation.prompts alone gives sample completions)."
        )
    if "classification" in tasks and not (tuning and finetune.task == "classification"):
        yield "evaluate.tasks", (
            "lists 'classification', which needs the classification head of a fine-tuned model. Fix: set "
            "finetune.task: classification (and enable fine-tuning), or remove 'classification'."
        )


def _environment_problems(recipe: Recipe) -> Iterator[Problem]:
    """What depends on this machine: files, Hub ids, installed trackers. Nothing is loaded or downloaded."""
    if recipe.output_dir.exists() and not recipe.output_dir.is_dir():
        yield "output_dir", f"{str(recipe.output_dir)!r} is a file. Fix: point output_dir at a folder."
    from pipeline.sources import SourceSpec, validate_source

    spec_fields = set(SourceSpec.__dataclass_fields__)
    checked = set()
    for key, source in _all_sources(recipe):
        spec = {k: v for k, v in recipe_to_dict(source).items() if k in spec_fields}
        fingerprint = json.dumps(spec, sort_keys=True)
        if fingerprint in checked:
            continue  # copies of data.sources (e.g. in tokenizer.sources) report once
        checked.add(fingerprint)
        try:
            validate_source(spec)
        except (ValueError, FileNotFoundError) as error:
            yield f"{key}.name", str(error)
    for key, location in (("tokenizer.path", recipe.tokenizer.path), ("model.path", recipe.model.path),
                          ("finetune.base", recipe.finetune.base)):
        if location is not None:
            yield from _check_model_location(key, location)
    for stage, key, train in (("pretrain", "pretrain", recipe.pretrain), ("finetune", "finetune.train", recipe.finetune.train)):
        if not recipe.runs(stage):
            continue
        if train.resume not in ("auto", "never") and not Path(train.resume).exists():
            yield f"{key}.resume", (
                f"checkpoint {train.resume!r} does not exist. Fix: use 'auto', 'never' or an existing checkpoint folder."
            )
        yield from _check_trackers(f"{key}.trackers", train.trackers)


def _all_sources(recipe: Recipe) -> Iterator[tuple[str, SourceSection]]:
    lists = [("data.sources", recipe.data.sources), ("tokenizer.sources", recipe.tokenizer.sources),
             ("evaluate.general", recipe.evaluate.general), ("evaluate.domain", recipe.evaluate.domain),
             ("finetune.data.sources", recipe.finetune.data.sources)]
    for key, sources in lists:
        for index, source in enumerate(sources or []):
            yield f"{key}[{index}]", source


def _resolve_source_name(name: str) -> str:
    """Existing local paths and globs become absolute; corpus names and Hub ids stay as they are."""
    from pipeline.sources import CORPORA

    if name in CORPORA or name.startswith("hub:"):
        return name
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded) or glob.has_magic(expanded):
        return os.path.abspath(expanded)
    return name


def _check_model_location(key: str, location: str) -> Iterator[Problem]:
    """A tokenizer/model is an existing local folder or a Hub id; anything else is a typo'd path."""
    if Path(location).expanduser().exists():
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(location)
    except HFValidationError:
        yield key, (
            f"{location!r} is neither an existing local folder (working directory {Path.cwd()}) nor a Hub repo id. "
            "Fix: check the path, or write the Hub id as 'owner/name'."
        )


def _check_trackers(key: str, trackers: list[str]) -> Iterator[Problem]:
    others = [t for t in trackers if t != "jsonl"]
    if not others:
        return
    import importlib.util

    from accelerate.utils import LoggerType  # only when a tracker beyond our own jsonl is asked for

    known = ["jsonl"] + [t.value for t in LoggerType]
    for index, tracker in enumerate(trackers):
        if tracker not in known:
            yield f"{key}[{index}]", f"expected one of {choices(known)}, got {tracker!r}.{suggest(tracker, known)}"
        elif tracker != "all" and tracker in others and importlib.util.find_spec(tracker) is None:
            yield f"{key}[{index}]", f"tracker {tracker!r} is not installed. Fix: pip install {tracker}, or remove it."


# ------------------------------------------------------------------------------------------ overrides

_KEY_STEP = re.compile(r"([A-Za-z_]\w*)((?:\[\d+\])*)")


def _apply_override(raw: dict[str, Any], override: str, problems: list[Problem]) -> None:
    """Set ``a.b[1].c=VALUE`` in the raw recipe; VALUE is YAML. The key is checked against the schema here."""
    key, equals, text = override.partition("=")
    key = key.strip()
    example = "Fix: write KEY=VALUE, e.g. pretrain.learning_rate=1e-3."
    if not equals or not key:
        problems.append((key, f"override {override!r} is not KEY=VALUE. {example}"))
        return
    steps: list[str | int] = []
    for part in key.split("."):
        match = _KEY_STEP.fullmatch(part)
        if not match:
            problems.append((key, f"override {override!r}: {part!r} is not a key. {example}"))
            return
        steps.append(match.group(1))
        steps += [int(i) for i in re.findall(r"\d+", match.group(2))]
    try:
        value = yaml12.load(text)
    except yaml.YAMLError as error:
        problems.append((key, f"override value {text!r} is not valid YAML ({error}). Fix: quote it."))
        return

    tp, node, where = Recipe, raw, ""
    for n, step in enumerate(steps):
        tp = _nullable(tp)[0]
        if isinstance(step, str):  # a key of a section (or of a dict field)
            if _is_model(tp):
                if step not in tp.model_fields:
                    suggestion = suggest(step, tp.model_fields, list_all=True)
                    problems.append((_join(where, step), f"unknown key in override {override!r}.{suggestion}"))
                    return
                child_tp = tp.model_fields[step].annotation
            elif get_origin(tp) is dict:
                child_tp = get_args(tp)[1]
            else:
                problems.append((where, f"override {override!r}: {where} is {_type_name(tp)}, it has no key {step!r}."))
                return
            child = node.get(step)
            where = _join(where, step)
        else:  # an index into a list field
            if get_origin(tp) is not list:
                problems.append((where, f"override {override!r}: {where} is {_type_name(tp)}, not a list."))
                return
            if step >= len(node):
                problems.append((f"{where}[{step}]", (f"override {override!r}: index out of range, the recipe lists "
                                 f"{len(node)} entries. Fix: override the whole list, e.g. {where}=[...].")))
                return
            child_tp, child = get_args(tp)[0], node[step]
            where = f"{where}[{step}]"
        if n == len(steps) - 1:
            node[step] = value
            return
        wants_key = isinstance(steps[n + 1], str)
        if wants_key and child is None:
            child = node[step] = {}  # an absent or empty section: the override creates it
        if not isinstance(child, dict if wants_key else list):
            kind = "a section" if wants_key else "a list"
            problems.append((where, f"override {override!r}: the recipe sets {where} to {_describe(child)}, not {kind}."))
            return
        tp, node = child_tp, child


# ------------------------------------------------------------------------------------------ pydantic errors, worded

_BOUNDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
_SOFT = _BOUNDS | {"too_short", "string_too_short", "extra_forbidden", "recipe_problems"}  # the type is right


def _translate(error: ValidationError, root: type[BaseModel], prefix: str = "") -> list[Problem]:
    """One problem per pydantic error (a section's ``problems()`` give several), in the order a reader scans the
    recipe: section by section, unknown keys of a section first (pydantic reports them last)."""
    problems: list[Problem] = []
    listed: set[Any] = set()  # sections whose valid keys were listed: once is enough
    details = [(_walk(root, d["loc"]), d) for d in error.errors(include_url=False)]
    for (rank, owner, field, tp), detail in sorted(details, key=lambda pair: pair[0][0]):
        path = _join(prefix, _dotted(detail["loc"]))
        if detail["type"] == "recipe_problems":
            problems += [(_join(path, key), message) for key, message in detail["ctx"]["problems"]]
        elif len(problems) >= MAX_LISTED:  # counted, not shown: no suggestions to compute
            problems.append((path, f"{detail['msg']}."))
        else:
            problems.append((path, _message(detail, owner, field, tp, list_keys=owner not in listed)))
            if detail["type"] == "extra_forbidden":
                listed.add(owner)
    return problems


@functools.cache
def _fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    return dict(model.model_fields)  # pydantic rebuilds the mapping on each access: slow for 100k errors


def _walk(root: type, loc: tuple[str | int, ...]) -> tuple[tuple[int, ...], Any, FieldInfo | None, Any]:
    """Follow an error location through the schema: (sort key, model owning the last key, its field, the type)."""
    rank: list[int] = []
    tp, owner, field = root, None, None
    for step in loc:
        tp = _nullable(tp)[0]
        if _is_model(tp) and isinstance(step, str):
            fields = _fields(tp)
            owner, field = tp, fields.get(step)
            rank.append(list(fields).index(step) if field else -1)
            tp = field.annotation if field else None
        else:  # a list index or a dict key: items keep their order
            rank.append(step if isinstance(step, int) else 0)
            tp = get_args(tp)[-1] if get_origin(tp) in (list, dict) else None
            field = None
    return tuple(rank), owner, field, tp


def _message(detail: dict[str, Any], owner: Any, field: FieldInfo | None, tp: Any, list_keys: bool = True) -> str:
    kind, value = detail["type"], detail.get("input")
    metadata = _metadata(field) if field else []
    fix = next((f" Fix: {m.fix}." for m in metadata if isinstance(m, Meta) and m.fix), "")
    if kind == "missing":
        return f"is required ({_type_name(tp)}) but missing. Fix: add it."
    if kind == "extra_forbidden":
        return f"unknown key.{suggest(str(detail['loc'][-1]), owner.model_fields if owner else [], list_all=list_keys)}"
    if kind in _BOUNDS:
        return f"must be {_range(metadata)}, got {value!r}.{fix}"
    if kind in ("too_short", "string_too_short"):
        return f"must not be empty, got {value!r}.{fix}"
    inner, optional = _nullable(tp)
    if tp is None or kind not in ("recipe_type", "literal_error", "list_type", "dict_type", "model_type"):
        return f"{detail['msg']} (got {_describe(value)})."  # not expected from the recipe's own types
    if value is None:
        return f"expected {_type_name(tp)}, got null. Fix: give a value, or delete the key to use the default."
    expected = _type_name(tp)
    if kind == "model_type":
        expected = f"a mapping of {inner.__name__} keys" + " or null" * optional
    message = f"expected {expected}, got {_describe(value)}"
    if kind == "recipe_type":
        return message + "." + detail["ctx"]["fix"]
    if kind == "literal_error":
        options = get_args(inner)
        hint = (" (YAML reads unquoted yes/no/on/off/true/false as booleans). Fix: write one of them, quoted if it is "
                "such a word") if isinstance(value, bool) else ""
        return f"{message}{hint}.{suggest(str(value), options)}"
    if kind == "list_type" and isinstance(value, (str, int, float)):
        return f"{message}. Fix: write a list, e.g. [{value}]."
    return message + "."


def _metadata(field: FieldInfo) -> list[Any]:
    """A field's ``Annotated`` metadata, also from inside ``X | None`` (pydantic lifts only the outer level)."""
    found = list(field.metadata)
    for arm in get_args(field.annotation) if _nullable(field.annotation)[1] else ():
        for item in arm.__metadata__ if get_origin(arm) is Annotated else ():
            found += item.metadata if isinstance(item, FieldInfo) else [item]
    return found


def _range(metadata: list[Any]) -> str:
    bounds = {name: getattr(m, name) for m in metadata for name in ("gt", "ge", "lt", "le") if getattr(m, name, None) is not None}
    low = ("(", ">", bounds["gt"]) if "gt" in bounds else ("[", ">=", bounds["ge"]) if "ge" in bounds else None
    high = (")", "<", bounds["lt"]) if "lt" in bounds else ("]", "<=", bounds["le"]) if "le" in bounds else None
    if low and high:
        return f"in {low[0]}{low[2]}, {high[2]}{high[0]}"
    bound = low or high
    return f"{bound[1]} {bound[2]}" if bound else "in range"


def _nullable(tp: Any) -> tuple[Any, bool]:
    """(X, whether null is allowed) for X, ``X | None`` and ``Annotated[...]`` around either."""
    optional = False
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp):
            tp, optional = next(arm for arm in get_args(tp) if arm is not type(None)), True
        else:
            return tp, optional


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _type_name(tp: Any, plural: bool = False) -> str:
    tp, optional = _nullable(tp)
    if optional:
        return f"{_type_name(tp, plural)} or null"
    if get_origin(tp) is Literal:
        return f"one of {choices(get_args(tp))}"
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0], plural=True)}"
    if get_origin(tp) is dict or _is_model(tp):
        return "mappings" if plural else "a mapping"
    names = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
             str: ("a string", "strings"), Path: ("a path", "paths")}
    return names[tp][plural] if tp in names else str(tp)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (list, tuple)):
        return f"a list ({len(value)} items)"
    return "a mapping" if isinstance(value, Mapping) else f"a {type(value).__name__}"


# ------------------------------------------------------------------------------------------ helpers


def _dotted(loc: tuple[str | int, ...]) -> str:
    return "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in loc).lstrip(".")


def _join(path: str, key: str) -> str:
    return ".".join(part for part in (path, key) if part)


def _absolute(path: str | Path) -> Path:
    # absolute() rather than resolve(): keep the symlinks the user chose in their paths.
    return Path(os.path.abspath(Path(path).expanduser()))


def _lookup(resolved: dict[str, Any], dotted: str) -> Any:
    node: Any = resolved
    for i, key in enumerate(dotted.split(".")):
        if not isinstance(node, dict) or key not in node:
            options = list(node) if isinstance(node, dict) else []
            where = ".".join(dotted.split(".")[:i]) or "the recipe"
            raise ValueError(f"section_hash: {where} has no {key!r}.{suggest(key, options, list_all=True)}")
        node = node[key]
    return node


def _to_plain(value: Any, *, for_hash: bool, secrets: bool) -> Any:
    if isinstance(value, BaseModel):
        out = dict(_LEGACY_HASHED.get(type(value), {})) if for_hash else {}
        fields = sorted(type(value).model_fields.items(), key=lambda item: item[0] != "enabled")  # the switch first
        for name, field in fields:
            meta = next((m for m in field.metadata if isinstance(m, Meta)), Meta())
            if for_hash and (not meta.hash or (meta.hash_when_set and getattr(value, name) is None)):
                continue
            hidden = meta.secret and not secrets
            out[name] = None if hidden else _to_plain(getattr(value, name), for_hash=for_hash, secrets=secrets)
        return out
    if isinstance(value, (list, tuple)):
        return [_to_plain(v, for_hash=for_hash, secrets=secrets) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v, for_hash=for_hash, secrets=secrets) for k, v in value.items()}
    return str(value) if isinstance(value, Path) else value
