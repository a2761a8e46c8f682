"""main.py end to end on tiny local models and local text: outputs, results JSON, saved checkpoints, bad inputs."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from lib.allocation.atp import atp_allocation
from lib.models.matrices import block_matrices
from lib.models.structure import find_decoder_blocks

from conftest import NUM_BLOCKS, REPO

PPL_LINE = re.compile(r"^wikitext perplexity (\S+)$", re.MULTILINE)
SANITY_LINE = re.compile(r"^\s+block\s+(\d+): target (\S+) achieved (\S+)$", re.MULTILINE)


@pytest.fixture
def flags(model_dir, text_files):
    """flags(family) -> the flags of a small, fast, fully local run."""
    def make(family="llama"):
        return ["--model", model_dir(family), "--calib_data", text_files.calib, "--eval_data", text_files.eval,
                "--nsamples", "4", "--seqlen", "32", "--max_eval_windows", "4", "--calib_batch_size", "4",
                "--quiet"]
    return make


def floor_count(count: int, sparsity: float) -> int:
    """floor(count * s) forgiving binary noise in s (0.35 computed as 0.5 - 0.15 is meant as 0.35)."""
    return math.floor(round(count * sparsity, 6))


def expected_zeros(block: nn.Module, method: str, sparsity: float) -> int:
    """Zeros the pruner promises: Wanda floor(cols*s) per row, magnitude and SparseGPT floor(numel*s) per matrix."""
    total = 0
    for lin in block_matrices(block).values():
        rows, cols = lin.weight.shape
        total += rows * floor_count(cols, sparsity) if method == "wanda" else floor_count(rows * cols, sparsity)
    return total


def single_error_line(err: str) -> str:
    """The one `error:` line, which must end stderr (progress bars of model loading may precede it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    return errors[0]


# ---------------------------------------------------------------- successful runs

@pytest.mark.parametrize("family, method, beta", [
    ("llama", "wanda", "0.1"), ("llama", "sparsegpt", "0.1"), ("llama", "magnitude", "0.1"),
    ("mistral", "wanda", "0.05"), ("qwen2", "wanda", None), ("opt", "wanda", "0.1"),
])
def test_end_to_end_run_reports_perplexity_sanity_check_and_results(cli, flags, make_model, tmp_path, family,
                                                                      method, beta):
    results_path = tmp_path / "run.json"
    extra = ["--beta", beta] if beta is not None else []
    code, out, err = cli(*flags(family), "--prune_method", method, "--sparsity_ratio", "0.5", *extra,
                         "--results", results_path)
    assert code == 0, err

    ppl_match = PPL_LINE.search(out)
    assert ppl_match, out
    printed_ppl = float(ppl_match.group(1))
    assert math.isfinite(printed_ppl) and printed_ppl > 1
    assert "sparsity sanity check" in out
    sanity = SANITY_LINE.findall(out)
    assert [int(b) for b, _, _ in sanity] == list(range(NUM_BLOCKS))

    results = json.loads(results_path.read_text())
    plan = atp_allocation(0.5, float(beta), NUM_BLOCKS) if beta is not None else [0.5] * NUM_BLOCKS
    assert results["args"]["prune_method"] == method and results["args"]["sparsity_ratio"] == 0.5
    assert results["args"]["allocation"] == ("atp" if beta is not None else "uniform")
    assert results["perplexity"] == pytest.approx(printed_ppl, rel=1e-12)
    assert results["allocation"]["sparsities"] == pytest.approx(plan, abs=1e-12)

    blocks = find_decoder_blocks(make_model(family))
    records = results["blocks"]
    assert [r["block"] for r in records] == list(range(NUM_BLOCKS))
    for record, block, target, (_, shown_target, shown_achieved) in zip(records, blocks, plan, sanity):
        assert record["target"] == pytest.approx(target, abs=1e-12)
        assert record["weights"] == sum(lin.weight.numel() for lin in block_matrices(block).values())
        assert record["zeros"] == expected_zeros(block, method, target)
        assert record["achieved"] == record["zeros"] / record["weights"]
        # within the pruner's floor granularity: one weight per row (Wanda) or per matrix below the target
        rows = sum(lin.weight.shape[0] for lin in block_matrices(block).values())
        slack = (rows if method == "wanda" else len(block_matrices(block))) / record["weights"]
        assert target - slack <= record["achieved"] <= target + 1e-12
        assert float(shown_target) == pytest.approx(target, abs=5e-5)
        assert float(shown_achieved) == pytest.approx(record["achieved"], abs=5e-5)
    zeros = sum(r["zeros"] for r in records)
    assert results["overall_sparsity"] == pytest.approx(zeros / sum(r["weights"] for r in records))
    assert results["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert f"overall sparsity {results['overall_sparsity']:.4f}" in out

    timings = results["timings_s"]
    assert {"load_model", "prune", "eval_ppl", "total"} <= set(timings)
    assert all(v >= 0 for v in timings.values()) and timings["total"] >= timings["prune"]
    assert {"python", "torch", "transformers"} <= set(results["versions"])
    assert results["versions"]["torch"] == torch.__version__
    assert results["eval"]["windows"] == 4 and results["eval"]["seqlen"] == 32
    if method != "magnitude":
        assert results["calibration"]["nsamples"] == 4 and results["calibration"]["seed"] == 0


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_two_four_run_prunes_every_block_to_exactly_half(cli, flags, tmp_path, method):
    results_path = tmp_path / "run.json"
    code, _, err = cli(*flags(), "--prune_method", method, "--sparsity_type", "2:4", "--results", results_path)
    assert code == 0, err
    results = json.loads(results_path.read_text())
    assert results["args"]["sparsity_ratio"] == 0.5
    assert [r["achieved"] for r in results["blocks"]] == [0.5] * NUM_BLOCKS


@pytest.mark.parametrize("calib, evaluation", [("calib_jsonl", "eval_dataset"), ("calib_dataset", "eval_jsonl")])
def test_jsonl_and_saved_dataset_sources(cli, model_dir, text_files, tmp_path, calib, evaluation):
    results_path = tmp_path / "run.json"
    code, out, err = cli("--model", model_dir("llama"), "--calib_data", getattr(text_files, calib),
                         "--eval_data", getattr(text_files, evaluation), "--nsamples", "4", "--seqlen", "32",
                         "--max_eval_windows", "4", "--quiet", "--results", results_path)
    assert code == 0, err
    assert PPL_LINE.search(out)
    results = json.loads(results_path.read_text())
    layouts = {"calib_jsonl": "jsonl rows", "eval_jsonl": "jsonl rows", "calib_dataset": "saved dataset rows",
               "eval_dataset": "saved dataset rows"}
    assert results["calibration"]["layout"] == layouts[calib]
    assert results["eval"]["layout"] == layouts[evaluation]



def test_results_record_where_the_data_was_read(cli, model_dir, text_files, tmp_path, monkeypatch):
    """A relative data path, or one through a symbolic link, means nothing beside a results file read later: the
    record keeps the absolute path of the file itself (the flags' record keeps what was typed)."""
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "eval-link.txt").symlink_to(text_files.eval)
    shutil.copy(text_files.calib, tmp_path / "texts" / "calib.txt")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("--model", model_dir("llama"), "--calib_data", "texts/calib.txt", "--eval_data",
                       os.path.join("texts", "eval-link.txt"), "--nsamples", "4", "--seqlen", "32",
                       "--max_eval_windows", "2", "--quiet", "--results", "run.json")
    assert code == 0, err
    results = json.loads((tmp_path / "run.json").read_text())
    assert results["calibration"]["data"] == str((tmp_path / "texts" / "calib.txt").resolve())
    assert results["eval"]["data"] == str(text_files.eval.resolve())
    assert results["args"]["calib_data"] == "texts/calib.txt"

# ---------------------------------------------------------------- saved checkpoints

def test_save_model_round_trip(cli, flags, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import lib.outputs
    pruned_in_memory = {}
    real_save = lib.outputs.save_model_atomic

    def save_and_keep(model, tokenizer, directory):
        pruned_in_memory["model"] = model
        real_save(model, tokenizer, directory)

    monkeypatch.setattr(lib.outputs, "save_model_atomic", save_and_keep)
    save_dir, results_path = tmp_path / "pruned", tmp_path / "run.json"
    code, out, err = cli(*flags(), "--prune_method", "sparsegpt", "--beta", "0.1", "--sparsity_ratio", "0.6",
                         "--save_model", save_dir, "--results", results_path)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["pruned", "run.json"]  # no temporary directory left behind

    reloaded = AutoModelForCausalLM.from_pretrained(save_dir)
    original = pruned_in_memory["model"]
    records = json.loads(results_path.read_text())["blocks"]
    for record, block, block_in_memory in zip(records, find_decoder_blocks(reloaded), find_decoder_blocks(original)):
        reloaded_linears, memory_linears = block_matrices(block), block_matrices(block_in_memory)
        zeros = sum(int((lin.weight == 0).sum()) for lin in reloaded_linears.values())
        assert zeros == record["zeros"]
        for name, lin in reloaded_linears.items():
            assert torch.equal(lin.weight, memory_linears[name].weight)
    ids = torch.randint(0, reloaded.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, original(ids).logits, rtol=0, atol=1e-6)
    tokenizer = AutoTokenizer.from_pretrained(save_dir)
    assert tokenizer("It is a truth universally acknowledged").input_ids


def test_interrupted_save_leaves_nothing(cli, flags, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def save_then_interrupt(self, directory, *args, **kwargs):
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    argv = flags()  # the session's model directory is saved before save_pretrained is broken
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_interrupt)
    code, _, err = cli(*argv, "--sparsity_ratio", "0.5", "--save_model", tmp_path / "new" / "pruned")
    assert code != 0
    assert single_error_line(err) == "error: interrupted"
    assert os.listdir(tmp_path) == []


def test_failed_save_removes_its_temporary_directory(make_model, tokenizer, tmp_path, monkeypatch):
    from transformers import PreTrainedModel
    from lib.outputs import save_model_atomic

    def fail(self, directory, *args, **kwargs):
        open(os.path.join(directory, "config.json"), "w").close()
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        save_model_atomic(make_model("llama"), tokenizer, str(tmp_path / "pruned"))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- bad inputs

def nan_logits_loader(monkeypatch):
    import lib.models.loading
    real = lib.models.loading.load_model_and_tokenizer

    def load(name, dtype, device_map=None, **kwargs):
        model, tok = real(name, dtype, device_map=device_map, **kwargs)
        model.lm_head.register_forward_hook(lambda module, args, output: output * float("nan"))
        return model, tok
    monkeypatch.setattr(lib.models.loading, "load_model_and_tokenizer", load)


def flat_model_loader(monkeypatch):
    import lib.models.loading
    real = lib.models.loading.load_model_and_tokenizer

    class NoBlockList(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))

    def load(name, dtype, device_map=None, **kwargs):
        _, tok = real(name, dtype, device_map=device_map, **kwargs)
        return NoBlockList(), tok
    monkeypatch.setattr(lib.models.loading, "load_model_and_tokenizer", load)


def broken_model_dir(tmp_path):
    path = tmp_path / "broken_model"
    path.mkdir()
    (path / "config.json").write_text("{not json", encoding="utf-8")
    return path


def short_text(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Too short.", encoding="utf-8")
    return path


def filled_dir(tmp_path):
    path = tmp_path / "taken"
    path.mkdir()
    (path / "keep.txt").write_text("mine", encoding="utf-8")
    return path


# (extra flags or a function of tmp_path giving them, patch, exit code, text the message must contain)
BAD_INPUTS = {
    "beta above the limit": (["--beta", "0.4", "--sparsity_ratio", "0.5"], None, 3, "0.333333"),
    "negative beta": (["--beta", "-0.01"], None, 3, "--beta"),
    "sparsity 1.2": (["--sparsity_ratio", "1.2"], None, 3, "--sparsity_ratio"),
    "unknown prune method": (["--prune_method", "random"], None, 2, "invalid choice: 'random'"),
    "bad sparsity type": (["--sparsity_type", "4:2"], None, 2, "--sparsity_type"),
    "n:m with atp": (["--sparsity_type", "2:4", "--beta", "0.01"], None, 2, "does not apply"),
    "seqlen over positions": (["--seqlen", "1000"], None, 2, "exceeds the model's 128 positions"),
    "nsamples zero": (["--nsamples", "0"], None, 2, "--nsamples"),
    "missing model dir": (lambda t: ["--model", t / "no_model"], None, 2, "no such file or directory"),
    "empty model dir": (lambda t: ["--model", t], None, 2, "Give a local model directory"),
    "corrupt model config": (lambda t: ["--model", broken_model_dir(t)], None, 2, "cannot load it"),
    "missing calib file": (lambda t: ["--calib_data", t / "nope.txt"], None, 2, "--calib_data"),
    "missing eval file": (lambda t: ["--eval_data", t / "nope.jsonl"], None, 2, "--eval_data"),
    "eval text shorter than a window": (lambda t: ["--eval_data", short_text(t)], None, 2, "fewer than one window"),
    "unknown allocation": (["--allocation", "best"], None, 2, "invalid choice: 'best'"),
    "save_model not empty": (lambda t: ["--save_model", filled_dir(t)], None, 2, "not an empty directory"),
    "results is a directory": (lambda t: ["--results", t], None, 2, "is a directory"),
    "unsupported architecture": ([], flat_model_loader, 2, "unsupported architecture NoBlockList"),
    "nan perplexity": ([], nan_logits_loader, 2, "perplexity is nan"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_error_line_and_no_files(cli, flags, tmp_path, monkeypatch, case):
    extra, patch, expected_code, fragment = BAD_INPUTS[case]
    work = tmp_path / "work"
    work.mkdir()
    extra = extra(work) if callable(extra) else extra
    # outputs in a directory that does not exist yet: a failed run must not create it either
    outputs = [] if "--results" in map(str, extra) else ["--results", work / "out" / "run.json"]
    argv = [*flags(), *outputs, *extra]
    if patch is not None:
        patch(monkeypatch)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    code, out, err = cli(*argv)
    assert code == expected_code, (out, err)
    assert fragment in single_error_line(err)
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before  # nothing written, not even partly
    assert not PPL_LINE.search(out)


def test_output_paths_under_a_file_are_rejected_before_any_work(cli, flags, tmp_path):
    (tmp_path / "plain").write_text("not a directory", encoding="utf-8")
    for flag in ("--results", "--save_model"):
        code, _, err = cli(*flags(), flag, tmp_path / "plain" / "sub" / "x")
        assert code == 2 and "is not a directory" in single_error_line(err)
    assert os.listdir(tmp_path) == ["plain"]


def test_model_and_demo_are_exclusive(cli):
    for argv in ([], ["--demo", "--model", "x/y"]):
        code, _, err = cli(*argv)
        assert code == 2 and "exactly one of --model or --demo" in single_error_line(err)


# ---------------------------------------------------------------- real processes

def run_main(*args, offline=True, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, str(REPO / "main.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=timeout)


def test_main_py_runs_end_to_end_in_a_subprocess(flags, tmp_path):
    proc = run_main(*flags("llama"), "--beta", "0.1", "--sparsity_ratio", "0.5", "--results", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert float(PPL_LINE.search(proc.stdout).group(1)) > 1
    assert "sparsity sanity check" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["args"]["beta"] == 0.1


def test_hub_model_without_internet_names_the_local_model_flag(text_files, tmp_path):
    proc = run_main("--model", "some-org/some-model", "--calib_data", text_files.calib, "--eval_data",
                    text_files.eval, "--results", tmp_path / "r.json")
    assert proc.returncode == 2
    line = single_error_line(proc.stderr)
    assert "--model some-org/some-model" in line and "local model directory" in line
    assert os.listdir(tmp_path) == []


def test_hub_calibration_data_without_internet_names_the_local_data_flag(model_dir, text_files, tmp_path):
    proc = run_main("--model", model_dir("llama"), "--calib_data", "c4", "--eval_data", text_files.eval,
                    "--nsamples", "4", "--seqlen", "32", "--quiet", "--results", tmp_path / "r.json")
    assert proc.returncode == 2
    line = single_error_line(proc.stderr)
    assert "c4" in line and "--calib_data FILE" in line
    assert os.listdir(tmp_path) == []


def test_hub_evaluation_data_failure_names_the_local_data_flag(cli, model_dir, text_files, tmp_path, monkeypatch):
    import lib.data

    def unreachable():
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(lib.data, "_wikitext2_documents", unreachable)
    code, _, err = cli("--model", model_dir("llama"), "--calib_data", text_files.calib, "--nsamples", "4",
                       "--seqlen", "32", "--quiet", "--results", tmp_path / "r.json")
    assert code == 2
    line = single_error_line(err)
    assert "wikitext2" in line and "--eval_data FILE" in line and "OfflineModeIsEnabled" in line
    assert os.listdir(tmp_path) == []
