"""The project's metrics as local `evaluate` modules, loaded by path so that nothing touches the Hub.

`evaluate.load("accuracy")` downloads the module from the Hub; `load_metric("accuracy")` loads
`pipeline/metrics/accuracy/accuracy.py` instead, works with `HF_HUB_OFFLINE=1`, and returns the same kind of
`evaluate.EvaluationModule` (`compute`, `add_batch`, `evaluate.combine` all work as usual).

Each metric is one folder holding one file of the same name, `<metric>/<metric>.py`, with a single
`evaluate.Metric` subclass. Those files stand alone: evaluate copies just that file into its modules cache
(`$HF_MODULES_CACHE`, default `$HF_HOME/modules`) and imports it from there, so they import only
datasets, evaluate, numpy and the standard library, never this package.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing evaluate costs seconds (it pulls in transformers); do it only when loading
    import evaluate

_METRICS_DIR = Path(__file__).resolve().parent

# Discovered from the folders, so adding a metric is adding its folder (package-data ships `metrics/*/*.py`).
METRICS: tuple[str, ...] = tuple(
    sorted(folder.name for folder in _METRICS_DIR.iterdir() if (folder / f"{folder.name}.py").is_file())
)


def metric_path(name: str) -> Path:
    """The module file of the metric `name`, e.g. `.../metrics/f1/f1.py`."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}. Available metrics: {', '.join(METRICS)}.")
    return _METRICS_DIR / name / f"{name}.py"


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """Load one of the project's metrics (see `METRICS`) from its local module file.

    `kwargs` go to `evaluate.load` (`experiment_id`, `num_process`, `process_id`, `cache_dir`, ...). Metric
    options such as f1's `average` belong to `compute`: `load_metric("f1").compute(..., average="macro")`.

    Unlike `evaluate.load`, predictions are kept in memory rather than in Arrow files under `$HF_HOME/metrics`
    (`keep_in_memory=True`) unless `num_process > 1`, where evaluate needs the shared files to gather
    across processes. Pass `keep_in_memory=False` to get evaluate's default back.
    """
    import evaluate

    path = metric_path(name)
    # evaluate.load forwards unknown keywords to the metric's __init__, which ignores them: an
    # `average="macro"` given here would silently compute the default average instead.
    accepted = set(inspect.signature(evaluate.load).parameters) - {"path", "init_kwargs"}
    unexpected = sorted(set(kwargs) - accepted)
    if unexpected:
        raise ValueError(
            f"load_metric({name!r}) got unexpected argument(s) {unexpected}. Metric options go to `compute`, "
            f"e.g. `load_metric({name!r}).compute(predictions=..., references=..., {unexpected[0]}=...)`; "
            f"load_metric accepts the arguments of evaluate.load: {sorted(accepted)}."
        )
    kwargs.setdefault("keep_in_memory", kwargs.get("num_process", 1) == 1)
    return evaluate.load(str(path), **kwargs)
