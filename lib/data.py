"""Calibration and evaluation text: the hub datasets of the paper, or local files for offline use.

A source is either a hub name ("c4", "wikitext2") or a local path: a .txt file (one document), a .jsonl/.json file
(one document per line, in its "text" field) or a directory written by `datasets.Dataset.save_to_disk`.
"""
from __future__ import annotations

import json
import os
import random

import torch

from tqdm.auto import tqdm

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
        return _texts(list(ds["text"]), flag, path, "row"), "saved dataset rows"
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag} {path}: cannot read it as UTF-8 text ({exc})") from None
    if path.endswith(".json") and raw.lstrip().startswith("["):  # a JSON array of {"text": ...} or strings
        try:
            rows = json.loads(raw)
            return _texts([r if isinstance(r, str) else r["text"] for r in rows], flag, path, "item"), "json rows"
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{flag} {path}: not a JSON array of strings or objects with a 'text' field") from None
    if path.endswith((".jsonl", ".json")):
        docs = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{flag} {path}: line {lineno} is not a JSON object with a 'text' field") from None
            if not isinstance(text, str):
                raise UserError(f"{flag} {path}: line {lineno}: 'text' is {type(text).__name__}, not a string")
            docs.append(text)
        return docs, "jsonl rows"
    return [raw], "text file"


def _texts(values: list, flag: str, path: str, what: str) -> list[str]:
    for number, value in enumerate(values, 1):
        if not isinstance(value, str):
            raise UserError(f"{flag} {path}: {what} {number}: 'text' is {type(value).__name__}, not a string")
    return values


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


# Calibration may reuse text (windows are random and may overlap), but not absurdly: beyond this many tokens of
# windows per token of text, the windows are mostly copies of each other and the run is almost surely a mistake.
MAX_WINDOW_TOKENS_PER_TEXT_TOKEN = 64


def calibration_documents(source: str) -> tuple[list[str], str]:
    """The calibration source's documents and their layout (read before any model is loaded)."""
    return _documents(source, "--calib_data", HUB_CALIBRATION, _c4_documents)


def evaluation_documents(source: str) -> tuple[list[str], str]:
    return _documents(source, "--eval_data", HUB_EVALUATION, _wikitext2_documents)


def check_calibration_size(source: str, documents: list[str], nsamples: int, seqlen: int) -> None:
    """Before tokenising: enough text for the windows (a token holds at least ~2 characters of prose)."""
    _check_text_size(source, sum(len(d) for d in documents) / 2, nsamples, seqlen)


def calibration_windows(source: str, tokenizer, nsamples: int, seqlen: int, seed: int,
                        progress: bool = False, documents: tuple[list[str], str] | None = None
                        ) -> tuple[torch.Tensor, str]:
    """`nsamples` random token windows of length `seqlen`, [nsamples, seqlen], reproducible for the same seed.

    Like the paper's code, a window is cut from a random document long enough to hold it; when no document is
    (short JSONL rows), windows come from all documents joined with blank lines. Each document is tokenised at
    most once, however many windows it gives.
    """
    docs, layout = documents or calibration_documents(source)
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise UserError(f"--calib_data {source}: no text found")
    check_calibration_size(source, docs, nsamples, seqlen)
    rng = random.Random(seed)
    tokenized: dict[int, torch.Tensor] = {}

    def tokens_of(index: int) -> torch.Tensor:
        if index not in tokenized:
            tokenized[index] = tokenizer(docs[index], return_tensors="pt").input_ids[0]
        return tokenized[index]

    windows = []
    attempts = 0
    bar = tqdm(total=nsamples, desc="calibration windows", unit="window", disable=not progress, leave=False)
    while len(windows) < nsamples and attempts < 50 * nsamples:
        attempts += 1
        ids = tokens_of(rng.randrange(len(docs)))
        if ids.numel() > seqlen:
            start = rng.randrange(ids.numel() - seqlen)
            windows.append(ids[start:start + seqlen])
            bar.update(1)
        if len(docs) == 1:
            if ids.numel() <= seqlen:
                break
            if len(windows) == 1:
                _check_text_size(source, ids.numel(), nsamples, seqlen)
    if len(windows) < nsamples:
        stream = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
        if stream.numel() <= seqlen:
            raise UserError(f"--calib_data {source}: only {stream.numel()} tokens, fewer than one window of "
                            f"--seqlen {seqlen}")
        _check_text_size(source, stream.numel(), nsamples, seqlen)
        while len(windows) < nsamples:
            start = rng.randrange(stream.numel() - seqlen)
            windows.append(stream[start:start + seqlen])
            bar.update(1)
    bar.close()
    return torch.stack(windows), layout


def _check_text_size(source: str, text_tokens: float, nsamples: int, seqlen: int) -> None:
    if nsamples * seqlen > MAX_WINDOW_TOKENS_PER_TEXT_TOKEN * text_tokens:
        raise UserError(f"--calib_data {source}: about {int(text_tokens)} tokens of text cannot give --nsamples "
                        f"{nsamples} x --seqlen {seqlen} windows without repeating each token more than "
                        f"{MAX_WINDOW_TOKENS_PER_TEXT_TOKEN} times; lower --nsamples or give more text")


def evaluation_tokens(source: str, tokenizer, documents: tuple[list[str], str] | None = None
                      ) -> tuple[torch.Tensor, str]:
    """The whole evaluation text as one token row [1, N]: hub/JSONL rows joined with "\\n\\n", a text file as is."""
    docs, layout = documents or evaluation_documents(source)
    text = "\n\n".join(docs)
    if not text.strip():
        raise UserError(f"--eval_data {source}: no text found")
    return tokenizer(text, return_tensors="pt").input_ids, layout
