"""Zero-shot accuracy of an in-memory (pruned) causal LM through stock lm-evaluation-harness.

lm-eval is imported only inside the functions that need it, so this module imports on machines without it.

Local tasks: a task YAML in `tasks_dir` may name its data with `dataset_path: json` and
`dataset_kwargs: {data_files: ...}`. Stock lm-eval hands those paths to `datasets.load_dataset`, which resolves
them against the working directory; here a relative path that exists next to the YAML is made absolute first,
so a task directory works from any working directory (see tasks/README.md).
"""
from __future__ import annotations

import difflib
import functools
import glob
import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError

DEFAULT_TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]

# The small offline task directory shipped with the repo (tasks/tiny_mc.yaml).
SHIPPED_TASKS_DIR = Path(__file__).resolve().parents[2] / "tasks"

# dataset_kwargs entries holding local paths that `datasets` would resolve against the working directory.
_PATH_KWARGS = ("data_files", "data_dir")


def _require_lm_eval() -> None:
    # find_spec rather than catching ImportError: a broken lm-eval install should show its real error.
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("zero-shot evaluation needs lm-evaluation-harness: pip install lm-eval")


@functools.lru_cache(maxsize=4)
def _task_manager(tasks_dir: str | None):
    """lm-eval's task index (built-in tasks plus `tasks_dir`); indexing takes seconds, so reuse it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=tasks_dir)


def resolve_local_paths(value: Any, base_dir: Path) -> Any:
    """`value` (a path, list of paths, or split -> path(s) dict) with each relative path that exists under
    `base_dir` (glob patterns allowed) made absolute; anything else is returned unchanged."""
    if isinstance(value, dict):
        return {key: resolve_local_paths(item, base_dir) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [resolve_local_paths(item, base_dir) for item in value]
    if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
        candidate = base_dir / value
        if candidate.exists() or glob.glob(str(candidate)):
            return str(candidate)
    return value


def _local_data_override(entry) -> dict | None:
    """The task's dataset_kwargs with YAML-relative data paths made absolute, or None if nothing changes."""
    cfg, yaml_path = getattr(entry, "cfg", None), getattr(entry, "yaml_path", None)
    if not isinstance(cfg, dict) or yaml_path is None or not isinstance(cfg.get("dataset_kwargs"), dict):
        return None
    kwargs = dict(cfg["dataset_kwargs"])
    for key in _PATH_KWARGS:
        if key in kwargs:
            kwargs[key] = resolve_local_paths(kwargs[key], Path(yaml_path).parent)
    return kwargs if kwargs != cfg["dataset_kwargs"] else None


def _task_spec(name: str, task_manager, scratch_dir: Path) -> str:
    """What to hand lm-eval for `name`: the name itself, or, when its data paths need anchoring to the YAML's
    directory, a wrapper YAML that includes the original and overrides only dataset_kwargs."""
    entry = task_manager.task_index.get(name)
    override = _local_data_override(entry) if entry is not None else None
    if override is None:
        return name
    wrapper = scratch_dir / f"{name}.yaml"
    wrapper.write_text(yaml.safe_dump({"include": str(Path(entry.yaml_path).resolve()), "dataset_kwargs": override}))
    return str(wrapper)


def _check_task_names(tasks: list[str], task_manager) -> None:
    known = task_manager.all_tasks
    for name in tasks:
        if name in known or (name.endswith(".yaml") and Path(name).is_file()):
            continue
        close = difflib.get_close_matches(name, known, n=5)
        hint = f"close matches: {', '.join(close)}; " if close else ""
        raise UserError(f"unknown zero-shot task {name!r} ({hint}for a local task, put its YAML in a directory "
                        "and pass --tasks_dir DIR; see tasks/README.md)")


def _hub_unreachable(exc: BaseException) -> bool:
    """True if `exc` or anything it was raised from is a network / offline-mode failure."""
    network_types: list[type] = [ConnectionError, TimeoutError]
    for module, names in (("huggingface_hub.errors", ("OfflineModeIsEnabled",)),
                          ("httpx", ("ConnectError", "TimeoutException")),
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):
        if importlib.util.find_spec(module.split(".")[0]) is not None:
            loaded = importlib.import_module(module)
            network_types += [getattr(loaded, name) for name in names if hasattr(loaded, name)]
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, tuple(network_types)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _load_tasks(tasks: list[str], task_manager) -> list:
    """lm-eval Task objects (groups flattened to their leaf tasks), loading each name's data separately so a
    hub failure names the task that caused it."""
    loaded = []
    with tempfile.TemporaryDirectory(prefix="zeroshot_tasks_") as scratch:
        for name in tasks:
            try:
                built = task_manager.load([_task_spec(name, task_manager, Path(scratch))])
            except Exception as exc:
                if not _hub_unreachable(exc):
                    raise
                entry = task_manager.task_index.get(name)
                source = (getattr(entry, "cfg", None) or {}).get("dataset_path")
                data = f"its data ({source})" if source else "its data"
                raise UserError(
                    f"zero-shot task {name!r}: {data} needs the HuggingFace hub, which is unreachable "
                    f"({type(exc).__name__}); use --tasks_dir with local task YAML files, e.g. the shipped "
                    "tasks/ directory") from exc
            loaded.extend(built["tasks"].values())
    return loaded


def _number_or_none(value: Any) -> float | None:
    # lm-eval writes "N/A" where a stderr cannot be computed (e.g. one sample).
    return float(value) if isinstance(value, (int, float)) else None


def _summarise(raw: dict, task_names: list[str], limit, version: str) -> dict:
    per_task = {}
    for name in task_names:
        row = raw["results"][name]
        if "acc,none" not in row:
            raise UserError(f"zero-shot task {name!r} reports no 'acc' metric; only multiple-choice accuracy "
                            "tasks are supported")
        per_task[name] = {
            "acc": float(row["acc,none"]),
            "acc_stderr": _number_or_none(row.get("acc_stderr,none")),
            "acc_norm": _number_or_none(row.get("acc_norm,none")),
            "acc_norm_stderr": _number_or_none(row.get("acc_norm_stderr,none")),
            "version": raw.get("versions", {}).get(name),
        }
    mean_acc = sum(r["acc"] for r in per_task.values()) / len(per_task)
    return {"lm_eval_version": version, "tasks": per_task, "mean_acc": mean_acc, "limit": limit, "num_fewshot": 0}


def check_tasks(tasks: list[str], tasks_dir: str | None = None):
    """Fail early (before hours of pruning) on a missing lm-eval or an unknown task name; returns the task index."""
    _require_lm_eval()
    if not tasks:
        raise UserError("no zero-shot tasks given")
    tasks_dir = str(Path(tasks_dir).resolve()) if tasks_dir is not None else None
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise UserError(f"--tasks_dir {tasks_dir} is not a directory")
    task_manager = _task_manager(tasks_dir)
    _check_task_names(tasks, task_manager)
    return task_manager


def evaluate_zero_shot(model, tokenizer, tasks: list[str], tasks_dir: str | None = None,
                       batch_size: int | str = 1, limit: int | float | None = None, seed: int = 0,
                       device: str | None = None) -> dict:
    """0-shot accuracy of `model` on lm-eval `tasks` (names; those in `tasks_dir` are found too).

    Returns a JSON-serialisable dict: lm_eval_version, tasks {name: acc, acc_stderr, acc_norm, acc_norm_stderr,
    version}, mean_acc, limit, num_fewshot (0). mean_acc is the unweighted mean of plain `acc` over the leaf
    tasks (a group is expanded into its tasks); acc_norm is reported per task but used nowhere in the mean.
    `limit` caps examples per task (a fraction if < 1). All seeds are set from `seed`, so a rerun is identical.
    `device`, if given, is where the model runs; it is moved back to its original device afterwards.
    """
    task_manager = check_tasks(tasks, tasks_dir)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    task_objects = _load_tasks(tasks, task_manager)

    original_device = next(model.parameters()).device
    if device is not None:
        model.to(device)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        raw = lm_eval.simple_evaluate(
            model=lm, tasks=task_objects, num_fewshot=0, batch_size=batch_size, limit=limit,
            task_manager=task_manager, log_samples=False, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        if device is not None:
            model.to(original_device)
    return _summarise(raw, [task.task_name for task in task_objects], limit, lm_eval.__version__)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_zero_shot_table(result: dict) -> str:
    """A plain aligned table (task, acc, acc_norm and their stderrs) ending with the mean-accuracy line."""
    header = ["task", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"]
    rows = [[name, _cell(r["acc"]), _cell(r["acc_stderr"]), _cell(r["acc_norm"]), _cell(r["acc_norm_stderr"])]
            for name, r in result["tasks"].items()]
    widths = [max(len(row[col]) for row in [header] + rows) for col in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(w) if col == 0 else cell.rjust(w)
                         for col, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    limit = "" if result.get("limit") is None else f", limit {result['limit']}"
    mean = f"mean acc over {len(rows)} tasks: {result['mean_acc']:.4f} ({result.get('num_fewshot', 0)}-shot{limit})"
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in rows] + [mean])
