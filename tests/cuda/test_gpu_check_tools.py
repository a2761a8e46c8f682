"""The CPU-testable parts of the GPU check: bench_prune.py's adapter around the reference implementation (with a
stand-in reference package, and with the real checkout when one is present), and scripts/gpu_check.sh's usage."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cuda_helpers import REPO

REFERENCE_DIR = os.environ.get("ATP_REFERENCE_DIR", str(REPO / ".reference" / "ATP"))

# A stand-in with the reference's calling conventions (lib/prune.py, lib/eval.py, `from .data import get_loaders`,
from conftest import load_script
# model.hf_device_map, model.seqlen, decoder layers called with position_ids only), recording what it saw.
FAKE_PRUNE = '''
import torch
from .data import get_loaders

SEEN = {}


def prune_wanda(args, model, tokenizer, device=torch.device("cuda:0"), sparsity_rates=None):
    loader, _ = get_loaders("c4", nsamples=args.nsamples, seed=args.seed, seqlen=model.seqlen, tokenizer=tokenizer)
    SEEN.update(windows=[inp for inp, _ in loader], map=dict(model.hf_device_map), seqlen=model.seqlen,
                rates=list(sparsity_rates), tf32=torch.backends.cuda.matmul.allow_tf32)
    layer = model.model.layers[0]
    hidden = model.model.embed_tokens(loader[0][0].to(device))
    positions = torch.arange(hidden.shape[1], device=device).unsqueeze(0)
    out = layer(hidden, attention_mask=None, position_ids=positions)  # no position_embeddings, as in 4.3x
    SEEN["layer_output"] = tuple(out.shape)
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data[:, ::2] = 0
    print("pruned")


def prune_sparsegpt(args, model, tokenizer, dev, sparsity_rates=None):
    torch.cuda.synchronize()  # unconditional in the reference
    prune_wanda(args, model, tokenizer, dev, sparsity_rates)
'''
FAKE_SPARSEGPT = '''
import torch
torch.backends.cuda.matmul.allow_tf32 = False  # the reference turns TF32 off at import
'''
FAKE_EVAL = '''
import torch
from .data import get_loaders
from . import sparsegpt  # noqa: F401


def eval_ppl(args, model, tokenizer, device=torch.device("cuda:0")):
    _, testenc = get_loaders("wikitext2", seed=0, seqlen=model.seqlen, tokenizer=tokenizer)
    return float(testenc.input_ids.numel())
'''


def fake_reference(root):
    lib = root / "ATP" / "lib"
    lib.mkdir(parents=True)
    (lib / "prune.py").write_text(textwrap.dedent(FAKE_PRUNE))
    (lib / "sparsegpt.py").write_text(textwrap.dedent(FAKE_SPARSEGPT))
    (lib / "eval.py").write_text(textwrap.dedent(FAKE_EVAL))
    (root / "ATP" / "COMMIT").write_text("0123abc\n")
    return root / "ATP"


def test_adapter_feeds_our_data_and_what_the_reference_expects(tmp_path):
    bench = load_script("bench_prune")
    model = bench.build_model("tiny", 16, torch.float32, torch.device("cpu"), torch.device("cpu"), 0, num_layers=3)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        reference = bench.ReferenceImplementation(str(fake_reference(tmp_path)))
        assert torch.backends.cuda.matmul.allow_tf32 is True  # its import-time switch is undone
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert reference.commit == "0123abc"
    calib = torch.randint(0, 500, (3, 16), generator=torch.Generator().manual_seed(0))
    printed = reference.run_prune("sparsegpt", model, calib, [0.6, 0.7, 0.8], 0, 16, torch.device("cpu"))
    seen = sys.modules[f"{bench.REFERENCE_PACKAGE}.prune"].SEEN
    assert printed == ["pruned"]
    assert len(seen["windows"]) == 3 and all(torch.equal(w, calib[i:i + 1]) for i, w in enumerate(seen["windows"]))
    assert seen["map"] == {} and seen["seqlen"] == 16 and seen["rates"] == [0.6, 0.7, 0.8]
    assert seen["layer_output"] == (1, 16, 64)  # the rotary embeddings were supplied
    assert not hasattr(model, "hf_device_map") and not hasattr(model, "seqlen")  # and taken away again
    assert all(not b._forward_pre_hooks for b in model.model.layers)
    assert float(model.model.layers[2].mlp.down_proj.weight.detach()[:, 0].abs().sum()) == 0.0
    eval_ids = torch.randint(0, 500, (1, 48))
    assert reference.run_eval(model, eval_ids, 16, torch.device("cpu")) == 48.0


def test_a_missing_reference_is_recorded_not_fatal(tmp_path):
    bench = load_script("bench_prune")
    args = bench.parse_args(["--shape", "tiny", "--device", "cpu", "--methods", "wanda", "--nsamples", "4",
                             "--seqlen", "32", "--eval_windows", "2", "--reference", str(tmp_path / "nowhere")])
    result = bench.run(args)
    record = result["reference_implementation"]
    assert record["status"].startswith("not available") and "lib/prune.py" in record["status"]
    assert record["methods"] == {} and result["methods"]["wanda"]["prune_seconds"] > 0


def test_beta_search_record_on_the_tiny_shape():
    bench = load_script("bench_prune")
    args = bench.parse_args(["--shape", "tiny", "--device", "cpu", "--methods", "wanda", "--nsamples", "4",
                             "--seqlen", "32", "--eval_windows", "3", "--beta_search", "--search_only",
                             "--search_step", "0.1", "--search_eval_windows", "2"])
    result = bench.run(args)
    search = result["beta_search"]
    assert result["methods"] == {} and result["complete"] is True
    assert search["num_trials"] >= 3 and len(search["trial_seconds"]) == search["num_trials"]
    assert 0.0 <= search["best_beta"] <= 0.6 + 1e-9 and search["seconds"] > 0  # 2 blocks at 0.7: beta <= 0.6
    assert search["peak_gib"] is None  # no GPU memory on the CPU


def test_reference_needs_its_fixed_buffer(tmp_path, capsys):
    bench = load_script("bench_prune")
    with pytest.raises(SystemExit):
        bench.parse_args(["--reference", str(tmp_path), "--nsamples", "129"])
    assert "at most 128" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isfile(os.path.join(REFERENCE_DIR, "lib", "prune.py")),
                    reason=f"no checkout of the reference implementation at {REFERENCE_DIR} (ATP_REFERENCE_DIR)")
def test_real_reference_side_by_side_on_the_tiny_shape():
    """The reference's own Wanda and SparseGPT on the same tiny model and data: Wanda's masks are ours exactly
    (fp32, the same per-row rule); SparseGPT's nearly (the same OBS updates, summed in another order)."""
    bench = load_script("bench_prune")
    args = bench.parse_args(["--shape", "tiny", "--device", "cpu", "--methods", "wanda,sparsegpt", "--nsamples", "6",
                             "--seqlen", "64", "--eval_windows", "3", "--calib_batch_size", "3",
                             "--reference", REFERENCE_DIR])
    result = bench.run(args)
    record = result["reference_implementation"]
    assert record["status"] == "ran"
    wanda, sparsegpt = record["methods"]["wanda"], record["methods"]["sparsegpt"]
    assert wanda["status"] == sparsegpt["status"] == "ran"
    assert all(b["agreement"] == 1.0 for b in wanda["mask_agreement"].values())
    assert wanda["perplexity"] == pytest.approx(result["methods"]["wanda"]["perplexity"], rel=1e-4)
    assert sparsegpt["mask_agreement"]["block_0"]["agreement"] > 0.99
    assert sparsegpt["achieved_sparsity"] == pytest.approx(result["methods"]["sparsegpt"]["achieved_sparsity"],
                                                           abs=2e-3)
    assert set(record["ours_over_reference"]) >= {"wanda_prune", "sparsegpt_prune", "wanda_eval"}


def test_gpu_check_script_parses_and_explains_itself():
    script = REPO / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0
    for step in ("env", "tests", "speedup", "prune_7b_wanda", "prune_7b_sparsegpt", "prune_13b_offload",
                 "search_7b", "--dry-run", "ATP_REFERENCE_DIR"):
        assert step in usage.stdout
    wrong = subprocess.run(["bash", str(script), "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 2 and "unknown argument" in wrong.stderr
