"""Shared fixtures: one tiny tokenizer per session, tiny models of each family saved as local HF model directories,
and small local calibration / evaluation texts in every supported layout. Nothing here touches the network."""
from __future__ import annotations

import builtins
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# The test models are tiny: with one thread they never wait on OpenMP barriers, which on a shared 2-core machine
# made each small matmul ~1000x slower than single-threaded.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent  # on sys.path through pytest.ini's `pythonpath`

from lib.demo.tiny import build_tiny_model, train_tokenizer  # noqa: E402

DATA = REPO / "data"


def load_script(name: str):
    """scripts/<name>.py as a fresh module: the scripts are entry points, not a package."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Importing matplotlib fails for the rest of the test, as on a machine without it."""
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", refuse)
FAMILIES = ("llama", "mistral", "qwen2", "opt")
NUM_BLOCKS = 4
HIDDEN = 64
MAX_POSITIONS = 128


@pytest.fixture(scope="session")
def austen_calib_text() -> str:
    return (DATA / "austen_calib.txt").read_text(encoding="utf-8")[:30000]


@pytest.fixture(scope="session")
def tokenizer(austen_calib_text):
    return train_tokenizer([austen_calib_text], vocab_size=512)


@pytest.fixture(scope="session")
def make_model(tokenizer):
    """make_model(family, seed) -> a fresh random tiny causal LM sized for the session tokenizer."""
    def make(family: str = "llama", seed: int = 0, num_layers: int = NUM_BLOCKS):
        return build_tiny_model(family, seed=seed, num_layers=num_layers, hidden=HIDDEN,
                                vocab_size=len(tokenizer), max_positions=MAX_POSITIONS)
    return make


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer, make_model):
    """model_dir(family) -> a local HF model directory (config, safetensors, tokenizer), built once per session."""
    cache: dict[str, Path] = {}

    def get(family: str = "llama") -> Path:
        if family not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            make_model(family).save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[family] = path
        return cache[family]
    return get


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


@pytest.fixture(scope="session")
def text_files(tmp_path_factory, austen_calib_text):
    """Small local data: calib/eval .txt, the same calibration text as JSONL rows and as a saved dataset."""
    from datasets import Dataset
    root = tmp_path_factory.mktemp("text")
    calib_text = austen_calib_text[:15000]
    eval_text = (DATA / "austen_eval.txt").read_text(encoding="utf-8")[:6000]
    files = SimpleNamespace(calib=root / "calib.txt", eval=root / "eval.txt", calib_jsonl=root / "calib.jsonl",
                            eval_jsonl=root / "eval.jsonl", calib_dataset=root / "calib_dataset",
                            eval_dataset=root / "eval_dataset", calib_rows=_paragraphs(calib_text),
                            eval_rows=_paragraphs(eval_text))
    files.calib.write_text(calib_text, encoding="utf-8")
    files.eval.write_text(eval_text, encoding="utf-8")
    for path, rows in ((files.calib_jsonl, files.calib_rows), (files.eval_jsonl, files.eval_rows)):
        path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    Dataset.from_dict({"text": files.calib_rows}).save_to_disk(str(files.calib_dataset))
    Dataset.from_dict({"text": files.eval_rows}).save_to_disk(str(files.eval_dataset))
    return files


@pytest.fixture
def cli(capsys):
    """cli(*flags) runs lib.cli.main in-process and returns (exit code, stdout, stderr)."""
    from lib.cli import main

    def run(*flags):
        code = main([str(f) for f in flags])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run
