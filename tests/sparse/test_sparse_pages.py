"""The packed weights' placement on transparent huge pages (lib/sparse/pages.py): same values, the data on a 2 MiB
boundary, huge pages where the OS gives them, nothing resident beyond the data, and left alone where it cannot."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib.sparse import format as fmt
from lib.sparse import pages
from lib.sparse.linear import SparseLinear

needs_thp = pytest.mark.skipif(not pages.available(), reason="no transparent huge pages here")


@needs_thp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_copy_holds_the_same_values_from_a_huge_page_boundary(dtype):
    count = (3 * pages.HUGE_PAGE // 2 + 1000) // torch.empty((), dtype=dtype).element_size()  # 1.5 huge pages
    source = (torch.randn(count) * 100).to(dtype).view(-1, 1)
    placed = pages.on_huge_pages(source)
    assert placed.data_ptr() != source.data_ptr()
    assert placed.data_ptr() % pages.HUGE_PAGE == 0
    assert placed.dtype == dtype and placed.shape == source.shape and torch.equal(placed, source)
    before = source.clone()
    placed.fill_(7)  # writable, and its own memory
    assert torch.equal(source, before) and bool((placed == 7).all())


@needs_thp
def test_whole_huge_pages_of_the_data_are_huge_and_nothing_beyond_the_data_is_resident():
    nbytes = 3 * pages.HUGE_PAGE + 5 * 4096 + 100
    placed = pages.on_huge_pages(torch.ones(nbytes // 4, dtype=torch.float32))
    placed.add_(1)  # every page touched
    info = pages.mapping_bytes(placed)
    assert info is not None
    assert info["AnonHugePages"] >= pages.HUGE_PAGE  # the kernel may refuse some under memory pressure, not all
    assert info["AnonHugePages"] <= 3 * pages.HUGE_PAGE
    assert info["Rss"] <= -(-nbytes // 4096) * 4096


def test_left_alone_where_it_cannot_or_need_not(monkeypatch):
    small = torch.randn(1000)
    assert pages.on_huge_pages(small) is small
    strided = torch.randn(pages.HUGE_PAGE // 2, 2)[:, 0]
    assert pages.on_huge_pages(strided) is strided
    big = torch.randn(pages.HUGE_PAGE // 4 + 1)
    monkeypatch.setenv("ATP_SPARSE_HUGE_PAGES", "0")
    assert not pages.available()
    assert pages.on_huge_pages(big) is big


def test_a_machine_without_thp_is_seen_as_such(monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(pages, "_THP_SETTING", str(setting))
    assert not pages.available()
    setting.write_text("always [madvise] never\n")
    assert pages.available() == hasattr(pages.mmap, "MADV_HUGEPAGE")
    monkeypatch.setattr(pages, "_THP_SETTING", str(tmp_path / "absent"))
    assert not pages.available()


@needs_thp
def test_sparse_linear_keeps_its_large_packed_tensors_on_huge_pages_and_computes_the_same():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 2048, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.6] = 0  # ~3.3 MB of fp32 values (the 256 KiB mask stays as it is)
    module = SparseLinear(2048, 1024, **fmt.pack(w))
    assert module.values.data_ptr() % pages.HUGE_PAGE == 0
    x = torch.randn(5, 2048, generator=g)
    torch.testing.assert_close(module(x), F.linear(x, w), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(module(x[:1]), F.linear(x[:1], w), rtol=1e-5, atol=1e-4)
