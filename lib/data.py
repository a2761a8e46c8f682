"""Calibration and evaluation text: the hub datasets of the paper, or local files for offline use.

A source is either a hub name ("c4", "wikitext2") or a local path: a .txt file (one document), a .jsonl/.json file
(one document per line, in its "text" field) or a directory written by `datasets.Dataset.save_to_disk`.
"""
from __future__ import annotations

import json
import os
import random

import torch

from .errors import UserError

HUB_CALIBRATION = ("c4",)
HUB_EVALUATION = ("wikitext2",)


def _load_hub(load) -> list[str]:
    try:
        import datasets  # noqa: F401  (imported lazily: not every machine running the pipeline has it)
    except ImportError:
        raise UserError("the 'datasets' package is needed for hub data: pip install datasets, "
                        "or pass local files with --calib_data / --eval_data") from None
    return load()


def _c4_documents() -> list[str]:
    from datasets import load_dataset
    ds = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    return ds["text"]


def _wikitext2_documents() -> list[str]:
    from datasets import load_dataset
    return load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]


def read_local_documents(path: str, flag: str) -> tuple[list[str], str]:
    """Documents of a local source and the layout they were read in ("text file", "jsonl rows", "saved dataset")."""
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file or directory")
    if os.path.isdir(path):
        try:
            from datasets import load_from_disk
            ds = load_from_disk(path)
        except ImportError:
            raise UserError(f"{flag} {path}: reading a saved dataset needs the 'datasets' package") from None
        except Exception as exc:  # datasets raises several types for a directory it cannot read
            raise UserError(f"{flag} {path}: not a dataset saved with save_to_disk ({exc})") from None
        if hasattr(ds, "keys"):  # a DatasetDict: prefer test for evaluation-like use, else the first split
            split = "test" if "test" in ds else next(iter(ds.keys()))
            ds = ds[split]
        if "text" not in ds.column_names:
            raise UserError(f"{flag} {path}: the saved dataset has no 'text' column")
        return list(ds["text"]), "saved dataset rows"
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag} {path}: cannot read it as UTF-8 text ({exc})") from None
    if path.endswith(".json") and raw.lstrip().startswith("["):  # a JSON array of {"text": ...} or strings
        try:
            rows = json.loads(raw)
            return [r if isinstance(r, str) else r["text"] for r in rows], "json rows"
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{flag} {path}: not a JSON array of strings or objects with a 'text' field") from None
    if path.endswith((".jsonl", ".json")):
        docs = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{flag} {path}: line {lineno} is not a JSON object with a 'text' field") from None
        return docs, "jsonl rows"
    return [raw], "text file"


def _documents(source: str, flag: str, hub_names: tuple[str, ...], hub_loader) -> tuple[list[str], str]:
    if source in hub_names:
        try:
            return _load_hub(hub_loader), f"hub {source}"
        except UserError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"could not load {source} from the HuggingFace hub ({first}); "
                            f"pass local data with {flag} FILE (text, JSONL or a saved dataset)") from None
    return read_local_documents(source, flag)


def calibration_windows(source: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> tuple[torch.Tensor, str]:
    """`nsamples` random token windows of length `seqlen`, [nsamples, seqlen], reproducible for the same seed.

    Like the paper's code, a window is cut from a random document long enough to hold it; when no document is
    (short JSONL rows), windows come from all documents joined with blank lines.
    """
    docs, layout = _documents(source, "--calib_data", HUB_CALIBRATION, _c4_documents)
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise UserError(f"--calib_data {source}: no text found")
    rng = random.Random(seed)
    windows = []
    attempts = 0
    while len(windows) < nsamples and attempts < 50 * nsamples:
        attempts += 1
        ids = tokenizer(docs[rng.randrange(len(docs))], return_tensors="pt").input_ids[0]
        if ids.numel() > seqlen:
            start = rng.randrange(ids.numel() - seqlen)
            windows.append(ids[start:start + seqlen])
    if len(windows) < nsamples:
        stream = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
        if stream.numel() <= seqlen:
            raise UserError(f"--calib_data {source}: only {stream.numel()} tokens, fewer than one window of "
                            f"--seqlen {seqlen}")
        while len(windows) < nsamples:
            start = rng.randrange(stream.numel() - seqlen)
            windows.append(stream[start:start + seqlen])
    return torch.stack(windows), layout


def evaluation_tokens(source: str, tokenizer) -> tuple[torch.Tensor, str]:
    """The whole evaluation text as one token row [1, N]: hub/JSONL rows joined with "\\n\\n", a text file as is."""
    docs, layout = _documents(source, "--eval_data", HUB_EVALUATION, _wikitext2_documents)
    text = "\n\n".join(docs)
    if not text.strip():
        raise UserError(f"--eval_data {source}: no text found")
    return tokenizer(text, return_tensors="pt").input_ids, layout
