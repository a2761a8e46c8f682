"""Regenerate the shipped English prose samples in data/ from the janeaustenr R package.

The Debian package r-cran-janeaustenr (or the CRAN package janeaustenr in any R library) holds Jane Austen's six
novels as character vectors, one element per printed line. This script reads them with the `rdata` package (no R
needed), joins lines into paragraphs and writes:

  data/austen_calib.txt  ~200 KB: opening of Sense and Sensibility + opening of Emma (calibration)
  data/austen_eval.txt   ~120 KB: opening of Persuasion (evaluation; a novel not used for calibration)

Usage:  python scripts/make_text_sample.py [--package-dir DIR] [--out-dir data]
The output is deterministic: the same package version always gives byte-identical files.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import os
import re
import struct
import subprocess
import sys
import zlib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R_LIBRARY_DIRS = ["/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library",
                  "/usr/local/lib/R/library"]

# (R object name, title, bytes to take); the calibration file concatenates its parts in order.
CALIB_PARTS = [("sensesensibility", "Sense and Sensibility", 100_000), ("emma", "Emma", 100_000)]
EVAL_PARTS = [("persuasion", "Persuasion", 120_000)]

HEADING = re.compile(r"^(chapter|volume|vol\.)\s+[0-9ivxlc]+\.?$|^(the\s+)?end(\s+of\s+.*)?\.?$|^finis\.?$",
                     re.IGNORECASE)
ITALIC = re.compile(r"_([^_]+)_")


def find_package_dir() -> str | None:
    """The installed janeaustenr directory: asked of dpkg first, then the usual R library folders."""
    try:
        listing = subprocess.run(["dpkg", "-L", "r-cran-janeaustenr"], capture_output=True, text=True,
                                 check=False).stdout
    except OSError:
        listing = ""
    for line in listing.splitlines():
        if line.rstrip("/").endswith("/janeaustenr") and os.path.isdir(line):
            return line
    for lib in R_LIBRARY_DIRS:
        candidate = os.path.join(lib, "janeaustenr")
        if os.path.isdir(candidate):
            return candidate
    return None


def _read_serialized(payload: bytes):
    """An R object from serialized bytes (.rds / lazy-load record) or a whole .rda file (then a dict)."""
    import rdata  # imported here so --help works without it
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that a bare serialization has no file type
        return rdata.conversion.convert(rdata.parser.parse_data(payload))


def _decompress_lazyload_record(record: bytes) -> bytes:
    """One record of an R lazy-load database: 4-byte big-endian length, then (usually) a zlib stream.

    R's other compressions put a type byte after the length: '2' bzip2, 'X' xz, '0' stored.
    """
    kind = record[4:5]
    if kind == b"2":
        import bz2
        return bz2.decompress(record[5:])
    if kind == b"X":
        import lzma
        return lzma.decompress(record[5:])
    if kind == b"0":
        return record[5:]
    expected = struct.unpack(">I", record[:4])[0]
    payload = zlib.decompress(record[4:])
    if len(payload) != expected:
        raise ValueError("corrupt lazy-load record")
    return payload


def read_novels(package_dir: str) -> dict[str, list[str]]:
    """All character vectors of the package's data, as {object name: list of lines}."""
    data_dir = os.path.join(package_dir, "data")
    novels: dict[str, list[str]] = {}
    rdx = os.path.join(data_dir, "Rdata.rdx")
    if os.path.exists(rdx):  # installed package: lazy-load database (index .rdx + records .rdb)
        with open(rdx, "rb") as handle:
            index_bytes = handle.read()
        if index_bytes[:2] == b"\x1f\x8b":
            index_bytes = gzip.decompress(index_bytes)
        index = _read_serialized(index_bytes)
        with open(os.path.join(data_dir, "Rdata.rdb"), "rb") as handle:
            records = handle.read()
        for name, (offset, length) in index["variables"].items():
            value = _read_serialized(_decompress_lazyload_record(records[offset:offset + length]))
            novels[str(name)] = [str(line) for line in value]
    for path in sorted(glob.glob(os.path.join(data_dir, "*.rda")) + glob.glob(os.path.join(data_dir, "*.RData"))):
        with open(path, "rb") as handle:  # source package layout: one .rda file per novel
            objects = _read_serialized(handle.read())
        for name, value in objects.items():
            novels[str(name)] = [str(line) for line in value]
    if not novels:
        raise SystemExit(f"no R data found under {data_dir}")
    return novels


def lines_to_paragraphs(lines: list[str]) -> list[str]:
    """Join printed lines into paragraphs, dropping the title page and chapter/volume headings."""
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(re.sub(r"\s+", " ", " ".join(current)))
            current = []
    first_chapter = next((i for i, p in enumerate(paragraphs) if p.lower().startswith("chapter")), 0)
    body = [ITALIC.sub(r"\1", p) for p in paragraphs[first_chapter:] if not HEADING.match(p)]
    return [p for p in body if p]


def take_prefix(paragraphs: list[str], max_bytes: int) -> list[str]:
    """The longest run of leading whole paragraphs whose text (blank-line separated) fits in max_bytes."""
    taken, size = [], 0
    for paragraph in paragraphs:
        added = len(paragraph.encode("utf-8")) + 2
        if size + added > max_bytes:
            break
        taken.append(paragraph)
        size += added
    return taken


def build_text(novels: dict[str, list[str]], parts: list[tuple[str, str, int]]) -> str:
    chunks = []
    for name, _title, max_bytes in parts:
        if name not in novels:
            raise SystemExit(f"novel {name!r} not in the package (have {sorted(novels)})")
        chunks.extend(take_prefix(lines_to_paragraphs(novels[name]), max_bytes))
    return "\n\n".join(chunks) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package-dir", help="installed janeaustenr directory (default: found via dpkg / R libs)")
    parser.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "data"))
    args = parser.parse_args(argv)
    package_dir = args.package_dir or find_package_dir()
    if not package_dir:
        print("janeaustenr not found: apt-get install r-cran-janeaustenr, or pass --package-dir", file=sys.stderr)
        return 1
    novels = read_novels(package_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    for filename, parts in (("austen_calib.txt", CALIB_PARTS), ("austen_eval.txt", EVAL_PARTS)):
        text = build_text(novels, parts)
        path = os.path.join(args.out_dir, filename)
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        print(f"wrote {path}: {len(text.encode('utf-8'))} bytes from {', '.join(t for _, t, _ in parts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
