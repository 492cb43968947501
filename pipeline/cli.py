"""Command line: `pipeline run RECIPE [--stages ...] [--dry-run] [KEY.SUB=VALUE ...]`, `schema`, `recipes`, `data`,
`inspect`, and what comes after training: `generate`, `chat`, `serve`, `merge`, `export`, `eval`.

The same command runs on many processes: `accelerate launch [--config_file ...] -m pipeline run RECIPE`.

This module only declares arguments. Each command is a short handler that imports the function doing the work
when it runs, so `--help` and argument errors answer at once; a new command (generate, chat, serve, merge, eval,
export) is one `_add_*` parser plus one handler over a function of the module that owns the job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path


DESCRIPTION = ("One YAML recipe from raw text to a trained, fine-tuned, evaluated model (run); then look inside it "
               "(inspect) and use it (generate, chat, serve, merge, export, eval).")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    from pipeline.recipe import RecipeError  # pydantic only: the handlers import what they need

    try:
        return args.handler(args)
    except RecipeError as error:  # a recipe refused (on load or by the pre-flight checks): nothing ran
        return _recipe_refused(error)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    # `run`'s KEY=VALUE overrides may come after its options (`run R --dry-run pretrain.max_steps=5`), where plain
    # argparse stops taking positionals; whatever else is left over is an error as usual.
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    if args.command in ("run", "data") and overrides:
        args.overrides = [*args.overrides, *overrides]
        extra = [item for item in extra if item not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def build_parser() -> argparse.ArgumentParser:
    from pipeline import __version__

    parser = argparse.ArgumentParser(prog="pipeline", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"pipeline {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run(commands)
    _add_schema(commands)
    _add_recipes(commands)
    _add_data(commands)
    _add_inspect(commands)
    _add_generate(commands)
    _add_chat(commands)
    _add_serve(commands)
    _add_merge(commands)
    _add_export(commands)
    _add_eval(commands)
    return parser


def _report(error: Exception, code: int = 1) -> int:
    """A problem with the user's input, data or world: its message names the problem and the fix, so it is printed
    without a traceback (PIPELINE_DEBUG=1 raises it instead)."""
    if os.environ.get("PIPELINE_DEBUG"):
        raise error
    print(f"error: {error}\n(set PIPELINE_DEBUG=1 for the traceback)", file=sys.stderr)
    return code


def _recipe_refused(error: Exception) -> int:
    """A recipe refused before anything ran: every problem with its key and fix; a traceback would add nothing."""
    print(f"error: {error}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------ run
def _add_run(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run", help="run a YAML recipe (all stages, or --stages)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  pipeline run recipes/quickstart.yaml\n"
               "  pipeline run recipes/quickstart.yaml --dry-run pretrain.max_steps=50 data.block_size=64\n"
               "  accelerate launch -m pipeline run recipes/medical-lora.yaml     # many processes or GPUs\n\n"
               "A rerun skips every finished stage whose recipe sections and data are unchanged. An interrupted\n"
               "training stage resumes from its newest sound checkpoint: pretrain.resume=auto (the default), or\n"
               "pretrain.resume=never (start afresh; old checkpoints are moved aside), or pretrain.resume=PATH\n"
               "(a checkpoint folder); finetune.train.resume likewise. --force STAGE rebuilds a finished stage.",
    )
    run.add_argument("recipe", help="path to the recipe YAML (recipes/quickstart.yaml is the default one)")
    run.add_argument("overrides", nargs="*", metavar="KEY.SUB=VALUE", help="override recipe values, e.g. pretrain.max_steps=50")
    run.add_argument("--stages", help="comma-separated subset of: tokenizer,pretrain,finetune,evaluate,hub")
    run.add_argument("--dry-run", action="store_true", help="print the resolved recipe and its plan; run nothing")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="rebuild STAGE even when it is up to date (repeatable); its old folder is moved aside")
    run.add_argument(
        "--num-processes", type=int, default=None,
        help="processes this run must have (refuses to start in any other world; default: what the launcher set)",
    )
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from pipeline.recipe import RecipeError, load_recipe, recipe_to_dict

    recipe = load_recipe(args.recipe, args.overrides)
    stages = args.stages.split(",") if args.stages else None
    if args.dry_run:
        import yaml

        from pipeline import preflight
        from pipeline.plan import plan

        print(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), end="")
        print("# plan\n" + json.dumps(plan(recipe, args.num_processes or 1), indent=2))
        preflight.check(recipe, stages)  # what `pipeline run` would refuse, refused here too
        return 0

    from accelerate import PartialState

    from pipeline.hub import HubPushError
    from pipeline.runner import run_recipe

    try:
        outcomes = run_recipe(recipe, stages=stages, expected_processes=args.num_processes, force=args.force)
    except RecipeError:  # the pre-flight checks: nothing ran (main says why)
        raise
    except (HubPushError, ValueError, FileNotFoundError, RuntimeError) as error:  # the user's data, world or Hub
        return _report(error)
    if PartialState().is_main_process:
        for outcome in outcomes:
            print(f"{outcome.stage:>10}: {outcome.status:<22} {outcome.folder}")
    return 0


# ------------------------------------------------------------------------------------------ schema
def _add_schema(commands: argparse._SubParsersAction) -> None:
    schema = commands.add_parser(
        "schema", help="print the recipe's JSON Schema (for editors: recipes name it in their first line)"
    )
    schema.set_defaults(handler=_schema)


def _schema(args: argparse.Namespace) -> int:
    from pipeline.recipe import recipe_json_schema

    print(json.dumps(recipe_json_schema(), indent=2))
    return 0


# ------------------------------------------------------------------------------------------ recipes, data
def _add_recipes(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "recipes", help="list the shipped recipes and launch configs; show or copy one",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  pipeline recipes                                  # each one's name and purpose\n"
               "  pipeline recipes show quickstart\n"
               "  pipeline recipes copy quickstart my-recipe.yaml   # then: pipeline run my-recipe.yaml --dry-run\n"
               "  pipeline recipes copy accelerate/fsdp configs/\n\n"
               "A copy never overwrites a file; a recipe gets recipe.schema.json beside it (its editor line names it).",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    actions = parser.add_subparsers(dest="action", metavar="{show,copy}")
    show = actions.add_parser("show", help="print a shipped recipe or launch config",
                              epilog="example: pipeline recipes show medical-lora")
    copy = actions.add_parser("copy", help="copy one to a file or folder (never overwrites)",
                              epilog="example: pipeline recipes copy quickstart recipes-of-mine/")
    for action in (show, copy):
        action.add_argument("name", help="a name from `pipeline recipes`, e.g. quickstart or accelerate/fsdp")
        action.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts")
    copy.add_argument("dest", help="a file (.yaml added when it has no suffix), or a folder (existing, or ending in /)")
    parser.set_defaults(handler=_recipes)


def _recipes(args: argparse.Namespace) -> int:
    from pipeline.starters import (
        copy_note,
        copy_starter,
        find_starter,
        listing,
        starters,
    )

    def described(starter) -> dict:
        return {"name": starter.name, "kind": starter.kind, "purpose": starter.purpose, "file": starter.file}

    try:
        if args.action is None:
            found = starters()
            print(json.dumps([described(s) for s in found], indent=2) if args.json else listing(found))
            return 0
        starter = find_starter(args.name)
        if args.action == "show":
            if args.json:
                print(json.dumps({**described(starter), "text": starter.text()}, indent=2))
            else:
                sys.stdout.write(starter.text())
            return 0
        written = copy_starter(args.name, args.dest)
    except (LookupError, OSError) as error:
        return _report(error, code=2)
    if args.json:
        print(json.dumps({"name": starter.name, "written": [str(path) for path in written]}, indent=2))
    else:
        print("\n".join(f"wrote {path}" for path in written) + "\n" + copy_note(starter, written[0]))
    return 0


def _add_data(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "data", help="a recipe's training data as the model sees it: blocks decoded, document boundaries, the "
                     "tokens left out of the loss, counts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  pipeline data recipes/quickstart.yaml                   # every training stage, 3 blocks each\n"
               "  pipeline data recipes/quickstart.yaml --stage finetune --split validation --blocks 1\n"
               "  pipeline data recipes/quickstart.yaml data.block_size=64 data.document_masking=true\n"
               "  pipeline data recipes/quickstart.yaml --stage pretrain --blocks 0 --json   # counts only\n\n"
               "It uses the tokenizer the stage will load (the run's tokenizer/, the base model's for fine-tuning):\n"
               "before the first run, `pipeline run RECIPE --stages tokenizer` (seconds). Nothing is written into\n"
               "the run folder; the blocks are cached where the stage looks for them.",
    )
    parser.add_argument("recipe", help="path to the recipe YAML")
    parser.add_argument("overrides", nargs="*", metavar="KEY.SUB=VALUE", help="override recipe values, as for run")
    parser.add_argument("--stage", choices=["pretrain", "finetune"],
                        help="one training stage (default: each one the recipe runs)")
    parser.add_argument("--split", choices=["train", "validation"], default="train",
                        help="the split the blocks come from (%(default)s); the counts cover both")
    parser.add_argument("--blocks", type=_non_negative, default=3, help="blocks or examples per stage (%(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print JSON: counts, settings and per block ids, tokens, labels, mask, document ids")
    parser.set_defaults(handler=_data)


def _data(args: argparse.Namespace) -> int:
    from pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        from pipeline import runner
        from pipeline.preview import check_stage, default_stages, preview_stage, render

        stages = [args.stage] if args.stage else default_stages(recipe)
        for stage in stages:  # every refusal before any data is loaded
            check_stage(recipe, stage)
        previews = [preview_stage(recipe, stage, split=args.split, blocks=args.blocks,
                                  tokenizer_staleness=lambda r: runner.freshness(r, "tokenizer").stale,
                                  recipe_file=args.recipe) for stage in stages]
    except (ValueError, OSError) as error:
        return _report(error, code=2)
    if args.json:
        print(json.dumps({"recipe": args.recipe, "stages": [p.to_dict() for p in previews]}, indent=2))
    else:
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        print("\n".join(render(p, color=color) for p in previews), end="")
    return 0


# ------------------------------------------------------------------------------------------ inspect
def _add_inspect(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect", help="look inside a model: tokens, params, similar, analogy, similarity, context, positions, "
                        "attention, next, decode",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  pipeline inspect similarity runs/quickstart/pretrain \"I am no good\" \"No, I am good!\" --bag-of-words\n"
               "  pipeline inspect context runs/quickstart/pretrain bank \"the bank of the river\" \"money in the bank\"\n"
               "  pipeline inspect attention runs/quickstart/pretrain \"ROMEO: O\" --png attention.png\n"
               "Each view takes any causal LM folder (a Quill, a Llama saved by transformers), --adapter, --json.",
    )
    sub = parser.add_subparsers(dest="what", required=True)

    def command(name: str, help_: str, example: str, *positionals: tuple[str, dict], note: str = ""
                ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"example:\n  pipeline inspect {name} {example}" + (f"\n{note}" if note else ""))
        p.add_argument("model", help="a model folder (a run's pretrain/ or finetune/merged/, any saved causal LM) or a "
                                     "Hub id")
        for dest, options in positionals:
            p.add_argument(dest, **options)
        if name != "tokens":
            p.add_argument("--adapter", type=Path, help="a PEFT adapter folder to attach to MODEL (finetune/adapter)")
        p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
        p.set_defaults(handler=_inspect)
        return p

    quick = "runs/quickstart/pretrain"
    text = ("text", {"help": "the text (one quoted argument)"})
    command("tokens", "split text into subwords and ids", f"{quick} \"To be, or not to be\"", text)
    command("params", "parameter counts per component (with --adapter: the LoRA adapter's own bucket)",
            f"{quick} --adapter runs/quickstart/finetune/adapter")
    p = command("similar", "nearest tokens in the input embedding space", f"{quick} \" king\" --metric cosine",
                ("text", {"help": "one token (a word inside a sentence keeps its leading space: \" king\")"}))
    p.add_argument("--metric", choices=["cosine", "dot"], default="cosine")
    p.add_argument("--top", type=_positive, default=10)
    p = command("analogy", "A is to B as C is to ?: the tokens nearest (cosine) to B - A + C",
                f"{quick} \" king\" \" queen\" \" man\"   # queen - king + man",
                *[(x, {"metavar": x.upper(), "help": f"word {x.upper()}: one token (see `inspect tokens`)"})
                  for x in "abc"])
    p.add_argument("--top", type=_positive, default=10)
    p = command("similarity", "sentence embeddings: pairwise cosine and dot product of pooled hidden states",
                f"{quick} \"I am no good\" \"No, I am good!\" --bag-of-words --png similarity.png",
                ("texts", {"nargs": "+", "metavar": "TEXT", "help": "two or more texts to compare"}))
    p.add_argument("--pooling", choices=["mean", "last", "first"], default="mean",
                   help="mean: average of the text's token states (default); last: its last token's, the only one a "
                        "causal LM has let read the whole text; first: its first token's ([CLS]-style; in a causal "
                        "LM it has seen only itself)")
    p.add_argument("--bag-of-words", action="store_true",
                   help="also the same matrices from summed input embeddings, where word order cannot matter")
    p.add_argument("--png", type=Path, help="also draw the matrices as heat maps into this file")
    p = command("context", "one word's vector at every layer in several sentences, and their similarity per layer",
                f"{quick} bank \"the bank of the river\" \"money in the bank\"",
                ("word", {"help": "the word to follow (its first occurrence; the mean over its tokens)"}),
                ("sentences", {"nargs": "+", "metavar": "SENTENCE", "help": "two or more sentences that contain it"}),
                note="A causal LM's vector of a word has read only what precedes it: put the telling words first\n"
                     "(\"the river flowed past the bank\"). Layer 0 is the input embedding: with RoPE, equal in\n"
                     "every sentence.")
    p.add_argument("--png", type=Path, default=Path("context.png"), help="line plot (%(default)s)")
    p = command("positions", "the positional encoding as a heat map", f"{quick} --length 128 --png positions.png")
    p.add_argument("--length", type=_positive, default=64)
    p.add_argument("--png", type=Path, default=Path("positions.png"), help="(%(default)s)")
    p = command("attention", "attention maps of every layer and head in one grid (or one, zoomed)",
                f"{quick} \"ROMEO: O, she doth teach the torches\" --layer 2 --head 1", text)
    p.add_argument("--layer", type=_non_negative, default=None, help="only this layer")
    p.add_argument("--head", type=_non_negative, default=None, help="only this head (with --layer: one large map)")
    p.add_argument("--top", type=_positive, default=3, help="keys listed per head (%(default)s)")
    p.add_argument("--png", type=Path, default=Path("attention.png"), help="(%(default)s)")
    p = command("next", "softmax over the vocabulary for the next token", f"{quick} \"ROMEO:\" --temperature 0.8", text)
    p.add_argument("--top", type=_positive, default=10)
    p.add_argument("--temperature", type=_non_negative_float, default=1.0, help="0 means greedy: all mass on the argmax")
    p = command("decode", "greedy / temperature / top-k / top-p side by side", f"{quick} \"ROMEO:\"", text)
    p.add_argument("--max-new-tokens", type=_positive, default=30)


def _inspect(args: argparse.Namespace) -> int:
    from pipeline.concepts import inspect_command

    try:
        return inspect_command(args)
    except (ValueError, OSError) as error:  # a user's folder, word, layer or prompt
        return _report(error, code=2)


def _number(text: str, kind: type, low: float, words: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {words}") from None
    if not value >= low:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not {words}")
    return value


def _positive(text: str) -> int:
    return int(_number(text, int, 1, "a whole number >= 1"))


def _non_negative(text: str) -> int:
    return int(_number(text, int, 0, "a whole number >= 0"))


def _non_negative_float(text: str) -> float:
    value = _number(text, float, 0, "a number >= 0")
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return float(value)


# ------------------------------------------------------------------------------------------ generate, chat, serve
_MODEL_HELP = ("a model folder (a run's pretrain/ or finetune/merged/, any save_pretrained causal LM) or a Hub id")


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=_MODEL_HELP)
    parser.add_argument("--adapter", type=Path, help="a PEFT adapter folder to attach to MODEL (e.g. finetune/adapter)")


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    """The `inference.Sampling` fields as options; the defaults are Sampling's own (tests/test_inference.py checks)."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (%(default)s)")
    group.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (%(default)s)")
    group.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = all (%(default)s)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off (%(default)s)")
    group.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top one; 0 = off (%(default)s)")
    group.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (%(default)s)")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="end the text before TEXT (repeatable; escapes like \\n are read)")
    group.add_argument("--seed", type=int, default=None, help="for reproducible samples (default: a fresh one)")


def _sampling(args: argparse.Namespace):  # -> inference.Sampling
    from pipeline.inference import Sampling

    stop = tuple(s.encode().decode("unicode_escape") for s in args.stop)
    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, stop=stop,
                    seed=args.seed, num_samples=getattr(args, "num_samples", 1))




def _add_generate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "generate", help="complete a prompt (or a file of them) with your sampling settings, streaming the text",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  pipeline generate runs/quickstart/finetune/merged \"ICD-10-CM code J45 means: \" --temperature 0\n"
               "  pipeline generate runs/quickstart/pretrain \"To be\" --adapter runs/quickstart/finetune/adapter\n"
               "  pipeline generate MODEL --file prompts.jsonl --num-samples 4 --seed 0 --json > out.jsonl\n"
               "  echo \"What is asthma?\" | pipeline generate MODEL - --chat --system \"Answer briefly.\"",
    )
    _add_model(parser)
    parser.add_argument("prompt", nargs="?", help="the prompt; - reads it from stdin")
    parser.add_argument("--file", type=Path, help="prompts, one a line; a .jsonl file: {\"prompt\": ...} or "
                        "{\"messages\": [...]} a line")
    parser.add_argument("--chat", action="store_true", help="send each text prompt as a user message through the "
                        "chat template")
    parser.add_argument("--system", help="the system message of --chat prompts")
    parser.add_argument("--num-samples", type=int, default=1, help="completions per prompt (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (%(default)s)")
    parser.add_argument("--json", action="store_true", help="one JSON object a prompt: completions, token counts, "
                        "settings")
    _add_sampling(parser)
    parser.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    from pipeline.inference import (
        as_chat,
        load_for_inference,
        print_completions,
        read_prompts,
    )

    try:
        sampling = _sampling(args)
        if (args.prompt is None) == (args.file is None):
            raise ValueError("give a PROMPT or --file PROMPTS (one of them)")
        if args.file is not None:
            prompts = read_prompts(args.file, chat=args.chat, system=args.system)
        else:
            text = sys.stdin.read().removesuffix("\n") if args.prompt == "-" else args.prompt
            prompts = [as_chat(text, args.system) if args.chat else text]
        model, tokenizer = load_for_inference(args.model, args.adapter)
        print_completions(model, tokenizer, prompts, sampling, as_json=args.json, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as error:
        return _report(error)
    return 0


def _add_chat(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "chat", help="talk to a model in the terminal, through its chat template",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="in the chat: /settings shows the sampling, /settings temperature=0.7 top_k=40 changes it,\n"
               "/reset forgets the conversation, /exit (or end of input, Ctrl-D) ends; Ctrl-C stops a reply.\n"
               "The oldest turns are dropped (and you are told) when the conversation outgrows the context.\n\n"
               "example:\n"
               "  pipeline chat runs/quickstart/finetune/merged --system \"Answer briefly.\" --temperature 0.7",
    )
    _add_model(parser)
    parser.add_argument("--system", help="the system message")
    parser.add_argument("--show-prompt", action="store_true",
                        help="write each prompt sent to the model (messages and rendered text) to stderr as JSON")
    _add_sampling(parser)
    parser.set_defaults(handler=_chat)


def _chat(args: argparse.Namespace) -> int:
    from pipeline.inference import chat_session, load_for_inference

    try:
        sampling = _sampling(args)
        model, tokenizer = load_for_inference(args.model, args.adapter)
        return chat_session(model, tokenizer, sampling, system=args.system,
                            show_prompt=sys.stderr if args.show_prompt else None)
    except (ValueError, FileNotFoundError) as error:
        return _report(error)


def _add_serve(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n"
               "  pipeline serve runs/quickstart/finetune/merged --port 8000\n"
               "  # then, with the openai client:\n"
               "  #   OpenAI(base_url=\"http://127.0.0.1:8000/v1\", api_key=\"unused\").chat.completions.create(\n"
               "  #       model=\"runs/quickstart/finetune/merged\", messages=[{\"role\": \"user\", \"content\": \"Hi\"}])\n"
               "On a GPU, serve the same model with vLLM: pipeline export MODEL OUT --format llama; vllm serve OUT",
    )
    _add_model(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="(%(default)s)")
    parser.add_argument("--model-name", help="the model's name in the API (default: MODEL as given)")
    parser.add_argument("--max-tokens-limit", type=int, default=1024,
                        help="largest max_tokens a request may ask for (%(default)s)")
    parser.add_argument("--max-request-bytes", type=int, default=1_000_000,
                        help="largest request body, in bytes (%(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("PIPELINE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $PIPELINE_API_KEY, else none)")
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        from pipeline.serve import serve
    except ModuleNotFoundError as error:
        return _report(ValueError(f"{error}: `pipeline serve` needs its server: pip install 'pipeline[serve]'"))

    try:
        serve(args.model, adapter=args.adapter, host=args.host, port=args.port, model_name=args.model_name,
              max_tokens_limit=args.max_tokens_limit, max_request_bytes=args.max_request_bytes, api_key=args.api_key)
    except (ValueError, FileNotFoundError) as error:
        return _report(error)
    return 0


# ------------------------------------------------------------------------------------------ merge, export
def _add_merge(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "merge", help="merge a LoRA adapter into its base (in float32) and save a standard model folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n"
               "  pipeline merge runs/quickstart/pretrain runs/quickstart/finetune/adapter merged/\n"
               "The folder loads with AutoModelForCausalLM.from_pretrained (a Quill also carries its code); the\n"
               "finetune stage's `finetune.merge: true` writes finetune/merged with the same function.",
    )
    parser.add_argument("base", help="the base model the adapter was trained on (a folder or a Hub id)")
    parser.add_argument("adapter", type=Path, help="the PEFT adapter folder (e.g. runs/quickstart/finetune/adapter)")
    parser.add_argument("out", type=Path, help="the new model folder (must not exist, or be empty)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the saved weights; the merge itself is always float32 (%(default)s)")
    parser.set_defaults(handler=_merge)


def _merge(args: argparse.Namespace) -> int:
    try:
        _refuse_non_empty(args.out)
        import torch

        from pipeline.loading import merge_adapter

        merge_adapter(args.adapter, args.base, args.out, dtype=getattr(torch, args.dtype))
    except (ValueError, OSError) as error:
        return _report(error)
    print(args.out)
    return 0


def _add_export(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export", help="export a model as a native Llama folder (vLLM, TGI, transformers 4.x) or a GGUF file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  pipeline export runs/quickstart/finetune/merged llama-out/ --format llama   # then: vllm serve llama-out/\n"
               "  pipeline export runs/quickstart/pretrain model.gguf --format gguf --adapter runs/quickstart/finetune/adapter\n"
               "A Quill exports when its architecture is Llama's (RoPE, SwiGLU, RMSNorm); otherwise the refusal names\n"
               "the field. GGUF needs the gguf package: pip install 'pipeline[export]'.",
    )
    parser.add_argument("model", help=_MODEL_HELP)
    parser.add_argument("out", type=Path, help="the folder (llama) or .gguf file (gguf) to write; never overwritten")
    parser.add_argument("--format", choices=["llama", "gguf"], required=True)
    parser.add_argument("--adapter", type=Path, help="a PEFT adapter to merge into MODEL first (in float32)")
    parser.add_argument("--dtype", choices=["f32", "f16"], default="f32", help="GGUF weights (%(default)s)")
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    try:
        if args.format == "llama":
            from pipeline.export import export_llama

            written = export_llama(args.model, args.out, adapter=args.adapter)
        else:
            from pipeline.export import export_gguf

            written = export_gguf(args.model, args.out, adapter=args.adapter, dtype=args.dtype)
    except (ValueError, OSError, ImportError) as error:
        return _report(error)
    print(written)
    return 0


# ------------------------------------------------------------------------------------------ eval
def _add_eval(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval", help="measure any model: perplexity and bits per byte on any text, lm-evaluation-harness tasks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  pipeline eval runs/quickstart/pretrain --source shakespeare --max-documents 100\n"
               "  pipeline eval runs/quickstart/pretrain --adapter runs/quickstart/finetune/adapter \\\n"
               "      --recipe recipes/quickstart.yaml --out eval-tuned/   # the run's held-out sets\n"
               "  pipeline eval llama/ --source notes.jsonl --text-column body --json\n"
               "  pipeline eval MODEL --source docs.jsonl --lm-eval my_task --lm-eval-include tasks/\n\n"
               "Bits per byte is lm-eval's: a loglikelihood_rolling task over the same documents gives the same\n"
               "figure (lm-eval runs on the loaded model with max_length = block size - 1, add_bos_token=False).\n"
               "lm-eval's own tasks download their data from the Hub; offline, use local task YAMLs.\n"
               "--lm-eval needs lm-evaluation-harness: pip install 'pipeline[clients]'.",
    )
    _add_model(parser)
    data = parser.add_argument_group("text to score (each --source is a set; --recipe adds general and domain)")
    data.add_argument("--source", action="append", default=[], metavar="NAME",
                      help="a corpus (shakespeare, icd10cm), a file, folder or glob, or a Hub dataset owner/name "
                           "(repeatable): the `name` of a recipe's source")
    data.add_argument("--text-column", default="text", help="the column holding the text (%(default)s)")
    data.add_argument("--split", default="train", help="the split to read, e.g. test or train[:10%%] (%(default)s)")
    data.add_argument("--subset", help="a Hub dataset's config name")
    data.add_argument("--sample-by", choices=["paragraph", "document", "line"], default="paragraph",
                      help=".txt files: one document per (%(default)s)")
    data.add_argument("--max-documents", type=_positive,
                      help="documents per set at most (a --source: the first N, N evenly spaced for a corpus; "
                           "--recipe: instead of evaluate.max_documents)")
    data.add_argument("--recipe", type=Path,
                      help="also score the held-out documents this recipe's evaluate stage scores")
    lm_eval = parser.add_argument_group("lm-evaluation-harness")
    lm_eval.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-eval tasks, groups or patterns")
    lm_eval.add_argument("--lm-eval-include", type=Path, metavar="DIR", help="a folder of local task YAML files")
    lm_eval.add_argument("--num-fewshot", type=_non_negative, help="few-shot examples (default: each task's own)")
    lm_eval.add_argument("--limit", type=_limit, help="documents per task: a count, or a fraction in (0, 1)")
    lm_eval.add_argument("--lm-eval-tokenizer-bos", action="store_true",
                         help="let the tokenizer add BOS, as stock lm-eval does (default add_bos_token=False: "
                              "rolling tasks then score exactly the text's tokens)")
    parser.add_argument("--block-size", type=_positive,
                        help="tokens per scoring window (default: a recipe set's own, else the model's positions)")
    parser.add_argument("--batch-size", type=_positive,
                        help="windows per batch (default: the recipe's evaluate.batch_size, else 8)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda when torch sees one, else cpu (%(default)s)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="(%(default)s)")
    parser.add_argument("--out", type=Path, help="write report.json and report.md into this new folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=_eval)


def _limit(text: str) -> int | float:
    value = float(_number(text, float, 0, "a count >= 1 or a fraction in (0, 1)"))
    if value >= 1 and value.is_integer():
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"{text!r} is not a count >= 1 or a fraction in (0, 1)")


def _eval(args: argparse.Namespace) -> int:
    from pipeline.recipe import RecipeError

    try:
        if args.out is not None:
            _refuse_non_empty(args.out)
        from pipeline.assess import LmEval, assess
        from pipeline.report import model_tables, write_model_report
        from pipeline.sources import SourceSpec

        sources = [SourceSpec(name=name, split=args.split, text_column=args.text_column, subset=args.subset,
                              sample_by=args.sample_by) for name in args.source]
        lm_eval = None if args.lm_eval is None else LmEval(
            tasks=tuple(task.strip() for task in args.lm_eval.split(",")), include=args.lm_eval_include,
            num_fewshot=args.num_fewshot, limit=args.limit, tokenizer_bos=args.lm_eval_tokenizer_bos)
        report = assess(args.model, adapter=args.adapter, sources=sources, recipe=args.recipe, lm_eval=lm_eval,
                        block_size=args.block_size, batch_size=args.batch_size, max_documents=args.max_documents,
                        device=args.device, dtype=args.dtype)
    except RecipeError:
        raise
    except (ValueError, OSError, ImportError) as error:
        return _report(error)
    if args.out is not None:
        write_model_report(report, args.out)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(model_tables(report), end="")
        if args.out is not None:
            print(f"report: {args.out / 'report.md'}")
    return 0


def _refuse_non_empty(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} already exists and is not empty: name a new folder (nothing was written)")


if __name__ == "__main__":
    sys.exit(main())
