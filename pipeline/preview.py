"""`pipeline data RECIPE`: a training stage's data as the model will see it, built by the functions the stage uses.

    preview_stage(recipe, stage)   the tokenizer the stage will use, `data.load_splits` + `data.tokenize_and_pack`
                                   (what `data.block_loaders` runs), or fine-tuning's instruction or
                                   classification examples (`pipeline.examples`) -> counts and the first blocks
    render(preview)                the terminal view: each block decoded, document boundaries, BOS/EOS, the tokens
                                   left out of the loss marked, and a header of counts and settings
    StagePreview.to_dict()         the same for scripts: ids, tokens, labels, the mask, document ids

Nothing is written into the run folder. The tokenized blocks are cached where the stage caches them (the run then
reads them instead of tokenizing again). Blocks are shown in their packed order; the training loader shuffles them.

The tokenizer is the one the stage will load: the run's ``tokenizer/`` (or ``tokenizer.path``) for pretraining,
the base model's for fine-tuning. Before the tokenizer stage has run there is none, and the preview says to run it
rather than train one itself: the function that trains it belongs to the tokenizer stage, which core modules do not
import; the stage takes seconds and its tokenizer is the one the run keeps, so the preview shows the very ids the
run will train on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import datasets
import pyarrow.compute as pc
from datasets import Dataset, IterableDataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipeline.artifacts import RunArtifacts, base_model, tokenizer_folder_problem
from pipeline.data import (
    IGNORE_INDEX,
    cached_map,
    held_out_sections,
    load_splits,
    tokenize_and_pack,
)
from pipeline.examples import classification_examples, instruction_examples
from pipeline.loading import load_tokenizer

if TYPE_CHECKING:
    from pipeline.recipe import DataSection, Recipe

__all__ = ["SPLITS", "STAGES", "Block", "Counts", "StagePreview", "check_stage", "default_stages", "preview_stage",
           "render"]

STAGES = ("pretrain", "finetune")
SPLITS = ("train", "validation")

BOUNDARY, OPEN, CLOSE, NEWLINE = "␞", "⟦", "⟧", "↵"
_STYLE = {"masked": "\x1b[2m", "special": "\x1b[36m", "boundary": "\x1b[35m", "title": "\x1b[1m", "note": "\x1b[33m"}
_RESET = "\x1b[0m"


# ------------------------------------------------------------------------------------------ what is shown


@dataclass(frozen=True)
class Counts:
    """One split (or one source) of a stage's data. None: not counted (a stream is not read to its end)."""

    documents: int | None  # rows read (the mixture's training split repeats a small, heavily weighted source)
    characters: int | None  # of the text column (None where a prompt template builds the text)
    tokens: int | None  # of every document with its BOS and EOS (causal LM); of every example (instruction, ...)
    examples: int | None  # packed blocks, or one example per kept row
    targets: int | None  # tokens the loss predicts: labels[1:] != -100, as the training loop counts them


@dataclass(frozen=True)
class Block:
    """One training example: a packed block, or an unpacked document or instruction / classification example."""

    index: int
    input_ids: list[int]
    labels: list[int]  # per token; -100 = not a target. Classification: empty, see `label`
    document_ids: list[int]  # per token: 0 for the block's first (maybe continued) document, +1 at each start
    tokens: list[str]  # the vocabulary's own strings (byte-level symbols: "Ġthe")
    text: str  # the block decoded, special tokens included
    position_ids: list[int] | None = None  # with document_masking: restart at every document start
    label: int | None = None  # classification: the class id
    label_name: str | None = None
    starts_document: bool = True  # False: the first token continues a document from the block before

    @property
    def masked(self) -> list[bool]:
        """Per token: excluded from the loss (label -100)."""
        return [label == IGNORE_INDEX for label in self.labels]

    @property
    def documents(self) -> int:
        return self.document_ids[-1] + 1 if self.document_ids else 0

    @property
    def targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels[1:]) if self.labels else 1


@dataclass
class StagePreview:
    stage: str  # "pretrain" or "finetune"
    section: str  # the recipe key of its data: "data" or "finetune.data"
    task: str  # "causal_lm", "instruction", "classification"
    settings: dict[str, Any]  # block_size, packing, document_masking, (prompt_template, label_column)
    tokenizer_location: str
    sources: list[dict[str, Any]]  # name, weight (+ Counts of the source read alone, for a mixture)
    splits: dict[str, Counts]
    split: str  # the split the blocks come from
    blocks: list[Block]
    tokenizer: PreTrainedTokenizerBase = field(repr=False)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        special = {name: getattr(self.tokenizer, name) for name in ("bos_token", "eos_token", "pad_token")}
        return {
            "stage": self.stage, "section": self.section, "task": self.task, "settings": self.settings,
            "tokenizer": {"location": self.tokenizer_location, "size": len(self.tokenizer), **special},
            "sources": self.sources, "splits": {name: asdict(counts) for name, counts in self.splits.items()},
            "split": self.split, "notes": self.notes,
            "blocks": [{**asdict(block), "masked": block.masked, "documents": block.documents,
                        "targets": block.targets} for block in self.blocks],
        }


# ------------------------------------------------------------------------------------------ checks


def default_stages(recipe: Recipe) -> list[str]:
    """The training stages a recipe runs, in order; an error naming the fix when it trains nothing."""
    stages = [stage for stage in STAGES if recipe.runs(stage)]
    if not stages:
        raise ValueError("this recipe trains nothing (pretrain.enabled and finetune.enabled are both false), so no "
                         "stage has training data to show. Fix: turn one on, e.g. finetune.enabled=true")
    return stages


def check_stage(recipe: Recipe, stage: str) -> None:
    """Refuse, before anything is loaded, a stage the recipe does not run."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: the stages with training data are {', '.join(STAGES)}")
    if stage == "pretrain" and not recipe.runs("pretrain"):
        raise ValueError("this recipe does not pretrain (pretrain.enabled: false), so `data` is only its general "
                         "held-out set. Fix: --stage finetune, or turn pretraining on with pretrain.enabled=true")
    if stage == "finetune" and not recipe.runs("finetune"):
        raise ValueError("this recipe does not fine-tune (finetune.enabled: false). Fix: --stage pretrain, or turn "
                         "fine-tuning on with finetune.enabled=true")
    task = recipe.finetune.task if stage == "finetune" else "causal_lm"
    if task != "causal_lm":
        if recipe.finetune.data.streaming:
            raise ValueError(f"task {task!r} reads its examples in memory. Fix: set finetune.data.streaming: false "
                             "(streaming is for task causal_lm).")


# ------------------------------------------------------------------------------------------ the preview


def preview_stage(
    recipe: Recipe,
    stage: str,
    *,
    split: str = "train",
    blocks: int = 3,
    tokenizer_staleness: Callable[[Recipe], str] | None = None,
    recipe_file: str = "RECIPE",
) -> StagePreview:
    """The data of ``stage`` ("pretrain" or "finetune") of a recipe: counts of both splits and the first ``blocks``
    examples of ``split``, exactly as the stage builds them.

    ``tokenizer_staleness(recipe)`` says why the run's tokenizer folder no longer matches the recipe ("" when it
    does; the CLI passes the runner's check); ``recipe_file`` only goes into the messages that give a command."""
    check_stage(recipe, stage)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    section = recipe.data if stage == "pretrain" else recipe.finetune.data
    task = recipe.finetune.task if stage == "finetune" else "causal_lm"
    tokenizer, location, from_run = _stage_tokenizer(recipe, stage, recipe_file)
    notes = []
    stale = _staleness(tokenizer_staleness, recipe) if from_run else ""
    if stale:
        notes.append(f"the run's tokenizer {stale}: the run will train a new one, so these ids will change. Fix: "
                     f"`pipeline run {recipe_file} --stages tokenizer`, then preview again")
    documents = load_splits(section, recipe.seed, held_out_sections(recipe))
    examples = _examples(recipe, task, section, tokenizer, documents)
    splits = {name: _counts(task, tokenizer, docs, ex) for name, docs, ex in zip(SPLITS, documents, examples)}
    chosen = examples[SPLITS.index(split)]
    names = _label_names(documents[0], recipe.finetune.label_column) if task == "classification" else None
    shown = [_block(index, row, tokenizer, task, names) for index, row in enumerate(itertools.islice(chosen, blocks))]
    return StagePreview(
        stage=stage, section="data" if stage == "pretrain" else "finetune.data", task=task,
        settings=_settings(recipe, task, section), tokenizer_location=location,
        sources=_sources(recipe, section, task, tokenizer), splits=splits, split=split, blocks=shown,
        tokenizer=tokenizer, notes=notes,
    )


def _staleness(check: Callable[[Recipe], str] | None, recipe: Recipe) -> str:
    if check is None:
        return ""
    try:
        return check(recipe)
    except (OSError, ValueError):  # a source that cannot be fingerprinted now: the run will say so itself
        return ""


def _stage_tokenizer(recipe: Recipe, stage: str, recipe_file: str) -> tuple[PreTrainedTokenizerBase, str, bool]:
    """(tokenizer, where it is, whether it is this run's): what the stage will load."""
    run = RunArtifacts.of(recipe)
    if stage == "finetune":
        base = base_model(recipe, check=False)
        ours = base == str(run.pretrain)
        if not ours:
            base_model(recipe)  # a local base that is missing: the stage's own error, naming the recipe key
        if not ours or tokenizer_folder_problem(base) is None:
            return load_tokenizer(base, fallback=run.tokenizer), base, ours
        # The base is this run's pretrain/, not trained yet: pretraining saves the run's tokenizer there.
    if tokenizer_folder_problem(str(run.tokenizer)) is None:
        return AutoTokenizer.from_pretrained(run.tokenizer), str(run.tokenizer), True
    if recipe.tokenizer.path is not None:  # what the tokenizer stage copies into the run
        return AutoTokenizer.from_pretrained(recipe.tokenizer.path), recipe.tokenizer.path, False
    raise FileNotFoundError(
        f"no tokenizer yet: {run.tokenizer} holds none. Fix: run `pipeline run {recipe_file} --stages tokenizer` "
        "first (it takes seconds, and the run keeps that tokenizer), then preview again"
    )


def _examples(recipe: Recipe, task: str, section: DataSection, tokenizer: PreTrainedTokenizerBase,
              documents: Sequence[Dataset | IterableDataset]) -> list[Dataset | IterableDataset]:
    """Both splits as the stage encodes them (`data.block_loaders`' packing; the finetune stage's example loaders)."""
    if task == "causal_lm":
        return [tokenize_and_pack(docs, tokenizer, block_size=section.block_size, packing=section.packing,
                                  document_masking=section.document_masking, num_proc=section.num_proc)
                for docs in documents]
    settings = {"max_length": section.block_size}
    if task == "instruction":
        settings |= {"prompt_template": recipe.finetune.prompt_template,
                     "response_column": recipe.finetune.label_column}
    else:
        settings |= {"label_column": recipe.finetune.label_column}
    build = instruction_examples if task == "instruction" else classification_examples
    return [build(docs, tokenizer, **settings) for docs in documents]


def _settings(recipe: Recipe, task: str, section: DataSection) -> dict[str, Any]:
    settings: dict[str, Any] = {"block_size": section.block_size, "streaming": section.streaming}
    if task == "causal_lm":
        settings |= {"packing": section.packing, "document_masking": section.document_masking}
    else:
        settings["label_column"] = recipe.finetune.label_column
    if task == "instruction":
        settings["prompt_template"] = recipe.finetune.prompt_template
    return settings


def _sources(recipe: Recipe, section: DataSection, task: str,
             tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    """The section's sources; with several, each one's counts as read alone (train and validation together)."""
    listed = [{"name": source.name, "weight": source.weight} for source in section.sources]
    if len(section.sources) == 1 or section.streaming or task != "causal_lm":
        return listed
    for entry, source in zip(listed, section.sources):
        alone = section.model_copy(update={"sources": [source]})
        splits = load_splits(alone, recipe.seed, held_out_sections(recipe))
        parts = [_document_counts(docs, tokenizer) for docs in splits]
        entry.update({key: sum(part[key] for part in parts) for key in parts[0]})
    return listed


# ------------------------------------------------------------------------------------------ counts


def _counts(task: str, tokenizer: PreTrainedTokenizerBase, documents: Dataset | IterableDataset,
            examples: Dataset | IterableDataset) -> Counts:
    if isinstance(examples, IterableDataset):
        return Counts(None, None, None, None, None)  # counting a stream would read all of it
    table = examples.with_format("arrow")[:]
    ids, labels = table["input_ids"], table["labels"]
    lengths = pc.list_value_length(ids)
    if task == "classification":
        targets = len(examples)
    else:
        after_first = pc.list_flatten(pc.list_slice(labels, 1))  # position 0 is never predicted
        targets = int(pc.sum(pc.not_equal(after_first, IGNORE_INDEX)).as_py() or 0)
    if task == "causal_lm":
        document = _document_counts(documents, tokenizer)
        return Counts(document["documents"], document["characters"], document["tokens"], len(examples), targets)
    characters = None if task == "instruction" else _characters(documents)  # instruction: a template makes the text
    return Counts(len(documents), characters, int(pc.sum(lengths).as_py() or 0), len(examples), targets)


def _document_counts(documents: Dataset, tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Non-empty documents, their characters and their tokens with BOS and EOS, as `tokenize_and_pack` encodes them;
    the token counts are cached beside the blocks, so a second preview does not tokenize again."""
    lengths = cached_map(documents, _token_counter(tokenizer), tokenizer=tokenizer, settings={"count": "bos+ids+eos"},
                         features=datasets.Features({"tokens": datasets.Value("int64")}), kind="token-counts",
                         columns=["text"], desc="Counting tokens")
    column = lengths.with_format("arrow")[:]["tokens"]
    return {"documents": int(pc.sum(pc.greater(column, 0)).as_py() or 0), "characters": _characters(documents),
            "tokens": int(pc.sum(column).as_py() or 0)}


def _token_counter(tokenizer: PreTrainedTokenizerBase) -> Callable[[dict[str, list]], dict[str, list[int]]]:
    def count(batch: dict[str, list]) -> dict[str, list[int]]:
        texts = [text or "" for text in batch["text"]]
        encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        return {"tokens": [len(ids) + 2 if text else 0 for text, ids in zip(texts, encoded)]}  # empty: skipped

    return count


def _characters(documents: Dataset) -> int:
    texts = documents.with_format("arrow")[:]["text"]
    return int(pc.sum(pc.utf8_length(pc.fill_null(texts, ""))).as_py() or 0)


def _label_names(documents: Dataset, column: str) -> list[str] | None:
    feature = documents.features.get(column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


# ------------------------------------------------------------------------------------------ blocks


def _block(index: int, row: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, task: str,
           names: list[str] | None) -> Block:
    ids = [int(token) for token in row["input_ids"]]
    position_ids = [int(p) for p in row["position_ids"]] if row.get("position_ids") is not None else None
    if task == "classification":
        label = int(row["labels"])
        return Block(index, ids, [], [0] * len(ids), tokenizer.convert_ids_to_tokens(ids), _decode(tokenizer, ids),
                     label=label, label_name=names[label] if names and 0 <= label < len(names) else None)
    labels = [int(label) for label in row["labels"]]
    if task == "causal_lm":
        starts = document_starts(ids, tokenizer.bos_token_id, tokenizer.eos_token_id)
        document_ids = list(itertools.accumulate(int(start and t > 0) for t, start in enumerate(starts)))
        opens = bool(starts and starts[0])
    else:
        document_ids, opens = [0] * len(ids), True  # one row, one example
    return Block(index, ids, labels, document_ids, tokenizer.convert_ids_to_tokens(ids), _decode(tokenizer, ids),
                 position_ids=position_ids, starts_document=opens)


def document_starts(ids: Sequence[int], bos: int, eos: int) -> list[bool]:
    """Per token: a document's first token, i.e. the BOS that `tokenize_and_pack` put before it. With BOS == EOS
    (GPT-2's ``<|endoftext|>``) a document's closing token is followed by the next one's opening token, and an
    opening token by text."""
    if bos != eos:
        return [token == bos for token in ids]
    starts = []
    for t, token in enumerate(ids):
        following = ids[t + 1] if t + 1 < len(ids) else None
        opens = following != eos if following is not None else t > 0 and ids[t - 1] == eos
        starts.append(token == bos and opens)
    return starts


def _decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


# ------------------------------------------------------------------------------------------ rendering


def render(preview: StagePreview, color: bool = False) -> str:
    """The terminal view of a stage's data: a header (tokenizer, settings, counts, legend), then each block."""
    paint = _painter(color)
    lines = [*_header(preview, paint), ""]
    total = preview.splits[preview.split].examples
    kind = "block" if preview.task == "causal_lm" and preview.settings["packing"] else "example"
    for block in preview.blocks:
        of = f" of {total:,}" if total is not None else ""
        facts = [f"{len(block.input_ids)} tokens"]
        if preview.task == "causal_lm":
            facts.append(f"{block.documents} document{'s' if block.documents != 1 else ''}")
        facts.append(f"{block.targets} target{'s' if block.targets != 1 else ''}")
        lines.append(paint("title", f"{kind} {block.index}{of} ({preview.split}) · {' · '.join(facts)}"))
        lines += _body(block, preview.tokenizer, paint, packed=kind == "block")
        if block.label is not None:
            name = f" ({block.label_name})" if block.label_name else ""
            lines.append(f"  → label {block.label}{name}")
        lines.append("")
    return "\n".join(lines)


def _painter(color: bool) -> Callable[[str, str], str]:
    def paint(style: str, text: str) -> str:
        return f"{_STYLE[style]}{text}{_RESET}" if color and text else text

    return paint


def _header(preview: StagePreview, paint: Callable[[str, str], str]) -> list[str]:
    tokenizer, settings = preview.tokenizer, preview.settings
    special = " · ".join(f"{name.upper()} {getattr(tokenizer, f'{name}_token')}" for name in ("bos", "eos", "pad")
                         if getattr(tokenizer, f"{name}_token") is not None)
    lines = [paint("title", f"━━ {preview.stage} · {preview.section} · task {preview.task} "),
             f"tokenizer   {preview.tokenizer_location} · {len(tokenizer):,} tokens · {special}"]
    lines += [f"{'layout' if i == 0 else '':<12}{line}" for i, line in enumerate(_layout(preview.task, settings))]
    sources = ", ".join(f"{s['name']} (weight {s['weight']:g})" if len(preview.sources) > 1 else s["name"]
                        for s in preview.sources)
    lines.append(f"sources     {sources}" + (" · mixed by weight; a small source repeats" if len(preview.sources) > 1
                                              else ""))
    lines += _table(preview)
    for note in preview.notes:
        lines.append(paint("note", f"note        {note}"))
    lines.append(f"legend      {' · '.join(_legend(preview, paint))}")
    if preview.split == "train" and preview.blocks:
        packed = preview.task == "causal_lm" and settings["packing"]
        order = ("as streamed, which is the order training reads them" if settings["streaming"] else
                 f"{'as packed' if packed else 'in data order'}; the training loader shuffles them")
        lines.append(f"order       {order}")
    return lines


def _legend(preview: StagePreview, paint: Callable[[str, str], str]) -> list[str]:
    newline = f"{NEWLINE} a newline of the text"
    if preview.task == "classification":
        return ["the loss is on each example's class id, not on its tokens", newline]
    legend = [f"{paint('masked', OPEN + '…' + CLOSE)} not a target (label -100)"]
    if preview.task == "causal_lm" and preview.settings["packing"]:
        legend += [f"{paint('boundary', '├─' + BOUNDARY + '─')} a document boundary",
                   "⋯ the document goes on in the block before / after"]
    return [*legend, newline, "a first token is never a target (each token is predicted from those before it)"]


def _layout(task: str, settings: Mapping[str, Any]) -> list[str]:
    size = settings["block_size"]
    if task == "instruction":
        template = settings["prompt_template"]
        prompt = f"prompt_template {template!r}" if template is not None else "the tokenizer's chat template"
        return [f"one example per row, at most {size} tokens: BOS + prompt ({prompt}) + response + EOS",
                f"the prompt is masked out of the loss; the response ({settings['label_column']}) and EOS are trained"]
    if task == "classification":
        return [f"one example per row, at most {size} tokens; one class id per example ({settings['label_column']})"]
    if not settings["packing"]:
        return [f"one document per example: BOS + text + EOS, cut at {size} tokens (packing off)"]
    masking = ("document_masking on: position ids restart at each document, which attends to no other"
               if settings["document_masking"] else "document_masking off: documents in a block attend to each other")
    return [f"packed: BOS + text + EOS per document, concatenated and cut every {size} tokens", masking,
            "a document's BOS is not a target when another document precedes it in the block"]


def _table(preview: StagePreview) -> list[str]:
    columns = ("documents", "characters", "tokens", "examples", "targets")
    label = "blocks" if preview.task == "causal_lm" and preview.settings["packing"] else "examples"
    lines = [f"{'':<12}{'':<12}" + "".join(f"{name if name != 'examples' else label:>13}" for name in columns)]
    rows = [(f"source {s['name']}", s) for s in preview.sources if "documents" in s]
    rows += [(name, asdict(counts)) for name, counts in preview.splits.items()]
    for name, values in rows:
        cells = "".join(f"{_number(values.get(column)):>13}" for column in columns)
        lines.append(f"{'':<12}{name:<12}{cells}")
    streamed = any(counts.examples is None for counts in preview.splits.values())
    if streamed:
        lines.append(f"{'':<12}(streamed: counting would read the whole stream)")
    train = preview.splits["train"]
    if preview.task == "causal_lm" and preview.settings["packing"] and train.tokens is not None:
        size = preview.settings["block_size"]
        dropped = train.tokens - train.examples * size
        lines.append(f"{'':<12}train: {train.examples:,} blocks × {size} tokens; the last {dropped:,} tokens fill no "
                     "block and are dropped")
    return lines


def _number(value: Any) -> str:
    return "–" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _body(block: Block, tokenizer: PreTrainedTokenizerBase, paint: Callable[[str, str], str],
          packed: bool) -> list[str]:
    """The block's text behind a gutter: special tokens as they are, runs left out of the loss in ⟦…⟧, a boundary
    line between documents, ↵ where the text has a newline, and ⋯ where a document goes on in the block before or
    after."""
    special = set(tokenizer.all_special_ids)
    masked = block.masked or [False] * len(block.input_ids)
    out = _Writer(paint)
    if packed and block.input_ids and not block.starts_document:
        out.write("masked", "⋯")
    runs = itertools.groupby(range(len(block.input_ids)),
                             key=lambda t: (block.document_ids[t], masked[t], block.input_ids[t] in special))
    document, open_mask = 0, False
    for (run_document, is_masked, is_special), positions in runs:
        if run_document != document:
            if open_mask:
                out.write("masked", CLOSE)
                open_mask = False
            out.boundary()
            document = run_document
        if is_masked != open_mask:
            out.write("masked", OPEN if is_masked else CLOSE)
            open_mask = is_masked
        text = _decode(tokenizer, [block.input_ids[t] for t in positions])
        out.write("masked" if is_masked else "special" if is_special else None, text)
    if open_mask:
        out.write("masked", CLOSE)
    if packed and block.input_ids and block.input_ids[-1] != tokenizer.eos_token_id:
        out.write("masked", " ⋯")
    return out.finish()


class _Writer:
    """Lines of a block's text behind a gutter; ANSI styles never cross a line end."""

    GUTTER = "  │ "

    def __init__(self, paint: Callable[[str, str], str]):
        self.paint, self.lines, self.current = paint, [], ""

    def write(self, style: str | None, text: str) -> None:
        for i, part in enumerate(text.split("\n")):
            if i:
                self.lines.append(self.GUTTER + self.current + self.paint("masked", NEWLINE))
                self.current = ""
            if part:
                self.current += self.paint(style, part) if style else part

    def boundary(self) -> None:
        self.lines.append(self.GUTTER + self.current)
        self.lines.append("  " + self.paint("boundary", f"├─{BOUNDARY}─"))
        self.current = ""

    def finish(self) -> list[str]:
        return [*self.lines, self.GUTTER + self.current]
