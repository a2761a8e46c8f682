"""The packed form of a pruned weight matrix (pure tensor math, no kernels, no I/O).

Format ("bitmask-packed", one per Linear, weight shape (rows, cols)):

* ``mask``: int64 (rows, words), words = ceil(cols / 64). Bit j of word w of row r is set when weight
  [r, 64*w + j] is nonzero (little-endian, so byte g of the row covers columns 8*g .. 8*g+7). Bits past
  ``cols`` are zero.
* ``values``: the nonzero weights, row-major, in the model's dtype (fp32, bf16 or fp16), followed by
  ``VALUE_PAD`` zeros so a kernel may load 8 values at once past the last nonzero of the last row.
* ``row_offsets``: int64 (rows + 1,): row r's nonzeros are ``values[row_offsets[r]:row_offsets[r+1]]``.

Why this layout. Bytes per weight = 1/8 (mask) + density * value bytes (+ 8 bytes per row): at 70% sparsity
1.325 B (fp32) and 0.725 B (bf16), against 4 and 2 dense. Alternatives cost more at the densities pruning gives:
CSR with int16 column indices costs density * (2 + value bytes), more than the bitmask whenever density > 1/16;
N:M index packing costs the same or more (2:4 keeps 2 two-bit indices per 4 weights = 1 bit/weight, exactly the
bitmask's cost; 4:8 needs 1.5 bits), so N:M patterns use this same format, with no second code path. The layout
is also what a CPU streams fastest: a kernel takes the mask 16 bits (16 columns) at a time and expands the next
popcount packed values into a 16-lane vector with one expand-load (AVX-512; AVX2: 8 bits at a time and a
table-driven permute), then does one FMA against the matching inputs: no per-nonzero index loads and work that
is one pass over contiguous memory.
Per-row offsets let rows run in parallel.
"""
from __future__ import annotations

import torch

VALUE_PAD = 8
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def words_for(cols: int) -> int:
    return (cols + 63) // 64


def pack(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """{'mask', 'values', 'row_offsets'} for a 2-D weight; zeros (exact 0.0) are the pruned entries."""
    if weight.dim() != 2:
        raise ValueError(f"pack needs a 2-D weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported weight dtype {weight.dtype}; use one of {SUPPORTED_DTYPES}")
    weight = weight.detach().cpu().contiguous()
    rows, cols = weight.shape
    words = words_for(cols)
    nonzero = weight != 0
    padded = torch.zeros(rows, words * 64, dtype=torch.bool)
    padded[:, :cols] = nonzero
    mask_bytes = (padded.view(rows, words * 8, 8).to(torch.uint8) * _BIT_WEIGHTS).sum(dim=2, dtype=torch.uint8)
    mask = mask_bytes.view(torch.int64).reshape(rows, words).contiguous()
    counts = nonzero.sum(dim=1, dtype=torch.int64)
    row_offsets = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(counts, dim=0, out=row_offsets[1:])
    values = torch.cat([weight[nonzero], torch.zeros(VALUE_PAD, dtype=weight.dtype)])
    return {"mask": mask, "values": values, "row_offsets": row_offsets}


def unpack_mask(mask: torch.Tensor, cols: int) -> torch.Tensor:
    """The bool (rows, cols) nonzero pattern of a packed mask."""
    rows, words = mask.shape
    mask_bytes = mask.contiguous().view(torch.uint8).reshape(rows, words * 8, 1)
    bits = (mask_bytes & _BIT_WEIGHTS) != 0
    return bits.reshape(rows, words * 64)[:, :cols]


def unpack(mask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, cols: int) -> torch.Tensor:
    """The dense (rows, cols) weight, in the values' dtype (the pure-PyTorch path; kernels have their own)."""
    nonzero = unpack_mask(mask, cols)
    dense = torch.zeros(nonzero.shape, dtype=values.dtype)
    nnz = int(row_offsets[-1])
    dense[nonzero] = values[:nnz]
    return dense


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def validate_packed(mask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, cols: int) -> None:
    """Raise ValueError unless the three tensors are one consistent packed matrix of `cols` columns: offsets start
    at 0 and never fall, each row's mask bits count exactly its values, no bit is set past `cols`, and the values
    carry the padding a kernel reads. Checked when a SparseLinear is built, so the C++ kernel and the PyTorch path
    accept exactly the same tensors (a corrupt file is one error, never different logits)."""
    rows = mask.shape[0]
    offsets = row_offsets.detach().cpu().to(torch.int64)
    if offsets.numel() != rows + 1 or int(offsets[0]) != 0:
        raise ValueError("row_offsets must have rows + 1 entries and start at 0")
    counts = offsets[1:] - offsets[:-1]
    bad = torch.nonzero(counts < 0)
    if len(bad):
        raise ValueError(f"row_offsets fall at row {int(bad[0])}")
    mask_bytes = mask.detach().cpu().contiguous().view(torch.uint8).reshape(rows, -1)
    bits = _POPCOUNT[mask_bytes.to(torch.int64)].sum(dim=1)
    bad = torch.nonzero(bits != counts)
    if len(bad):
        row = int(bad[0])
        raise ValueError(f"row {row}: its mask marks {int(bits[row])} nonzeros but row_offsets give it "
                         f"{int(counts[row])} values ({len(bad)} row(s) disagree): the packed tensors are corrupt")
    spare = mask_bytes.shape[1] * 8 - cols
    if spare:
        tail = unpack_mask(mask.detach().cpu(), mask_bytes.shape[1] * 8)[:, cols:]
        if bool(tail.any()):
            raise ValueError(f"mask bits are set past column {cols}: the packed tensors are corrupt")
    if values.numel() < int(offsets[-1]) + VALUE_PAD:
        raise ValueError(f"values hold {values.numel()} entries, fewer than the {int(offsets[-1])} nonzeros plus "
                         f"{VALUE_PAD} of padding")


def packed_nbytes(mask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor) -> int:
    """Bytes of the packed form as stored (mask + values incl. padding + offsets)."""
    return sum(t.numel() * t.element_size() for t in (mask, values, row_offsets))


def bytes_per_weight(density: float, value_bytes: int) -> float:
    """The format's asymptotic cost per weight (mask bit + packed value), ignoring per-row offsets."""
    return 1.0 / 8.0 + density * value_bytes
