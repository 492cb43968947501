"""Command line: `pipeline run RECIPE [--stages ...] [--dry-run] [KEY.SUB=VALUE ...]`.

The same command runs on many processes: `accelerate launch [--config_file ...] -m pipeline run RECIPE`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import yaml


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a YAML recipe (all stages, or --stages)")
    run.add_argument("recipe", help="path to the recipe YAML (recipes/quickstart.yaml is the default one)")
    run.add_argument("overrides", nargs="*", metavar="KEY.SUB=VALUE", help="override recipe values, e.g. pretrain.max_steps=50")
    run.add_argument("--stages", help="comma-separated subset of: tokenizer,pretrain,finetune,evaluate,hub")
    run.add_argument("--dry-run", action="store_true", help="print the resolved recipe and its plan; run nothing")
    run.add_argument(
        "--num-processes", type=int, default=None,
        help="processes this run must have (refuses to start in any other world; default: what the launcher set)",
    )

    from pipeline.concepts import add_inspect_commands

    add_inspect_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    return args.handler(args)


def _run(args: argparse.Namespace) -> int:
    from pipeline.recipe import RecipeError, load_recipe, recipe_to_dict

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stages = args.stages.split(",") if args.stages else None
    if args.dry_run:
        from pipeline.runner import plan

        print(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), end="")
        print("# plan\n" + json.dumps(plan(recipe, args.num_processes or 1), indent=2))
        return 0

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
    from accelerate import PartialState

    if PartialState().is_main_process:
        for outcome in outcomes:
            print(f"{outcome.stage:>10}: {outcome.status:<22} {outcome.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
