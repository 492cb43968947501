"""Command line: `pipeline run RECIPE [--stages ...] [--dry-run] [KEY.SUB=VALUE ...]`, `pipeline schema`,
`pipeline inspect ...`.

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run(commands)
    _add_schema(commands)
    _add_inspect(commands)
    return parser


# ------------------------------------------------------------------------------------------ run
def _add_run(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="run a YAML recipe (all stages, or --stages)")
    run.add_argument("recipe", help="path to the recipe YAML (recipes/quickstart.yaml is the default one)")
    run.add_argument("overrides", nargs="*", metavar="KEY.SUB=VALUE", help="override recipe values, e.g. pretrain.max_steps=50")
    run.add_argument("--stages", help="comma-separated subset of: tokenizer,pretrain,finetune,evaluate,hub")
    run.add_argument("--dry-run", action="store_true", help="print the resolved recipe and its plan; run nothing")
    run.add_argument(
        "--num-processes", type=int, default=None,
        help="processes this run must have (refuses to start in any other world; default: what the launcher set)",
    )
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from pipeline.recipe import RecipeError, load_recipe, recipe_to_dict

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stages = args.stages.split(",") if args.stages else None
    if args.dry_run:
        import yaml

        from pipeline.plan import plan

        print(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), end="")
        print("# plan\n" + json.dumps(plan(recipe, args.num_processes or 1), indent=2))
        return 0

    from accelerate import PartialState

    from pipeline.hub import HubPushError
    from pipeline.runner import run_recipe

    try:
        outcomes = run_recipe(recipe, stages=stages, expected_processes=args.num_processes)
    except (HubPushError, ValueError, FileNotFoundError, RuntimeError) as error:
        # Problems with the user's data, world or Hub access: the message names the problem and the fix.
        if os.environ.get("PIPELINE_DEBUG"):
            raise
        print(f"error: {error}\n(set PIPELINE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
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


# ------------------------------------------------------------------------------------------ inspect
def _add_inspect(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect", help="look inside a model: tokens, params, similar, positions, attention, next, decode"
    )
    sub = parser.add_subparsers(dest="what", required=True)

    def command(name: str, help_: str, text: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("model", help="a model folder saved by the pipeline (or a Hub id)")
        if text:
            p.add_argument("text")
        p.set_defaults(handler=_inspect)
        return p

    command("tokens", "split text into subwords and ids")
    command("params", "parameter counts per component", text=False)
    p = command("similar", "nearest tokens in embedding space")
    p.add_argument("--metric", choices=["cosine", "dot"], default="cosine")
    p.add_argument("--top", type=int, default=10)
    p = command("positions", "the positional encoding as a heat map", text=False)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--png", type=Path, default=Path("positions.png"))
    p = command("attention", "attention maps of one layer, all heads")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--png", type=Path, default=Path("attention.png"))
    p = command("next", "softmax over the vocabulary for the next token")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--temperature", type=float, default=1.0)
    p = command("decode", "greedy / temperature / top-k / top-p side by side")
    p.add_argument("--max-new-tokens", type=int, default=30)


def _inspect(args: argparse.Namespace) -> int:
    from pipeline.concepts import inspect_command

    return inspect_command(args)


if __name__ == "__main__":
    sys.exit(main())
