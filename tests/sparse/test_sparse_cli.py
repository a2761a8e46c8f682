"""--save_format compressed from the CLI: the same pruned model as the dense checkpoint, fewer bytes on disk."""
import json

import torch

from lib.sparse.checkpoint import load_compressed
from lib.sparse.linear import SparseLinear


def test_cli_compressed_checkpoint_matches_the_dense_one(cli, model_dir, text_files, tmp_path):
    flags = ["--model", model_dir("llama"), "--calib_data", text_files.calib, "--eval_data", text_files.eval,
             "--nsamples", "4", "--seqlen", "32", "--max_eval_windows", "2", "--quiet", "--sparsity_ratio", "0.7"]
    code, _, err = cli(*flags, "--save_model", tmp_path / "dense")
    assert code == 0, err
    code, out, err = cli(*flags, "--save_model", tmp_path / "packed", "--save_format", "compressed",
                         "--results", tmp_path / "run.json")
    assert code == 0, err
    saved = json.loads((tmp_path / "run.json").read_text())["saved_model"]
    dense_bytes = sum(p.stat().st_size for p in (tmp_path / "dense").iterdir())
    assert saved["bytes"] < 0.75 * dense_bytes and saved["sparse_modules"] == 4 * 7
    assert "lib.sparse.register()" in (tmp_path / "packed" / "README.md").read_text()
    assert f"pruned model saved to {tmp_path / 'packed'} (compressed: lib.sparse.register(), then" in out

    from transformers import AutoModelForCausalLM
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    packed, _ = load_compressed(str(tmp_path / "packed"))
    assert sum(isinstance(m, SparseLinear) for m in packed.modules()) == 4 * 7
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, packed(ids).logits, atol=1e-4, rtol=1e-4)
