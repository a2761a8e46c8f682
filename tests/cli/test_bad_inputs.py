"""Every bad input is one `error:` line naming the flag, exit 2 (3 for an illegal allocation), before any model
is loaded when the input can be checked without it, and with nothing left behind. Also: SIGTERM leaves nothing
half-written, and search logs survive what crashes leave in them."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

MODEL_LOADERS = (("lib.models.loading", "load_model_and_tokenizer"), ("lib.demo.models", "tiny_demo_model"))


@pytest.fixture
def loads(monkeypatch):
    """A list that gets an entry whenever a model is loaded (the loaders still run)."""
    import importlib
    calls = []
    for module_name, attr in MODEL_LOADERS:
        module = importlib.import_module(module_name)
        real = getattr(module, attr)

        def spy(*args, _real=real, **kwargs):
            calls.append(args[:1])
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, attr, spy)
    return calls


def jsonl(tmp, rows):
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def broken_checkpoint(tmp, model_dir, how):
    path = tmp / f"ckpt-{how}"
    shutil.copytree(model_dir("llama"), path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if how == "truncated" else os.urandom(len(data)))
    return path


def a_file(tmp):
    path = tmp / "plain.txt"
    path.write_text("x", encoding="utf-8")
    return path


# name: (flags, or a function (tmp, model_dir) -> flags; exit code; fragment of the error line; model loaded?)
CASES = {
    "truncated safetensors": (lambda t, m: ["--model", broken_checkpoint(t, m, "truncated")], 2, "cannot load it",
                              True),
    "random safetensors": (lambda t, m: ["--model", broken_checkpoint(t, m, "random")], 2, "cannot load it", True),
    "2:3 with wanda": (["--sparsity_type", "2:3"], 2, "--sparsity_type 2:3 needs every Linear input width", False),
    "2:3 with sparsegpt": (["--sparsity_type", "2:3", "--prune_method", "sparsegpt"], 2, "multiple of 3", False),
    "2:3 with magnitude": (["--sparsity_type", "2:3", "--prune_method", "magnitude"], 2, "multiple of 3", False),
    "jsonl text is a number": (lambda t, m: ["--calib_data", jsonl(t, [{"text": "ok"}, {"text": 123}])], 2,
                               "line 2: 'text' is int, not a string", False),
    "jsonl text is null": (lambda t, m: ["--eval_data", jsonl(t, [{"text": None}])], 2,
                           "line 1: 'text' is NoneType", False),
    "device foo": (["--device", "foo"], 2, "--device foo: not a device", False),
    "device cuda without one": (["--device", "cuda:0"], 2, "--device cuda:0: CUDA is not available", False),
    "search log is a directory": (lambda t, m: ["--beta", "search", "--search_log", t], 2,
                                  "--search_log", False),
    "search plot under a file": (lambda t, m: ["--beta", "search", "--search_plot", a_file(t) / "p.png"], 2,
                                 "--search_plot", False),
    "search step zero": (["--beta", "search", "--search_step", "0"], 2, "--search_step 0.0", False),
    "search step negative": (["--beta", "search", "--search_step", "-1"], 2, "--search_step -1.0", False),
    "search coarse zero": (["--beta", "search", "--search_coarse", "0"], 2, "--search_coarse 0: must be at least 2",
                           False),
    "zero-shot batch abc": (["--eval_zero_shot", "--zs_batch_size", "abc"], 2, "--zs_batch_size", False),
    "zero-shot limit negative": (["--eval_zero_shot", "--zs_limit", "-1"], 2, "--zs_limit -1.0", False),
    "too many calibration windows": (["--nsamples", "100000"], 2, "--nsamples 100000 x --seqlen 32", False),
    "missing relative model dir": (["--model", "nope_dir"], 2, "--model nope_dir: no such local directory", False),
    "illegal beta": (["--beta", "0.9"], 3, "--beta 0.9 is illegal", False),
    "sparsity above one": (["--sparsity_ratio", "1.5"], 3, "--sparsity_ratio 1.5", False),
    "unknown pruner parameter value": (["--prune_method", "ria", "--ria_exponent", "-1"], 2,
                                       "--ria_exponent must lie in [0, 10], got -1.0", False),
    "beta with dlp": (["--allocation", "dlp", "--beta", "0.01"], 2,
                      "--beta is a parameter of --allocation atp, not of --allocation dlp", False),
    "demo with hub calibration": (["--demo", "--calib_data", "c4"], 2, "could not load c4", False),
    # second hostile round: weights that do not match the model
    "missing weight tensor": (lambda t, m: ["--model", edited_checkpoint(t, m, drop="model.layers.2.mlp.down_proj")],
                              2, "1 missing weight(s) (model.layers.2.mlp.down_proj.weight)", True),
    "unexpected weight tensor": (lambda t, m: ["--model", edited_checkpoint(t, m, add="model.layers.9.odd.weight")],
                                 2, "1 unexpected weight(s) (model.layers.9.odd.weight)", True),
    "a compressed checkpoint as the model": (lambda t, m: ["--model", compressed_checkpoint(t, m)], 2,
                                             "is a compressed checkpoint (--save_format compressed)", False),
    "a compressed model's save_pretrained as the model": (
        lambda t, m: ["--model", compressed_checkpoint(t, m, manifest=False)], 2,
        "is a compressed checkpoint (--save_format compressed)", False),
    # flags that would be ignored or contradict each other
    "2:4 with another sparsity": (["--sparsity_type", "2:4", "--sparsity_ratio", "0.3"], 2,
                                  "--sparsity_ratio 0.3 contradicts --sparsity_type 2:4", False),
    "empty task list": (["--eval_zero_shot", "--tasks", ""], 2, "--tasks '' names no task", False),
    "task list of commas": (["--eval_zero_shot", "--tasks", ",,,"], 2, "--tasks ',,,' names no task", False),
    "tasks without zero-shot": (["--tasks", "piqa"], 2, "--tasks applies only with --eval_zero_shot", False),
    "zero-shot limit without zero-shot": (["--zs_limit", "5"], 2, "--zs_limit applies only with --eval_zero_shot",
                                          False),
    "zero-shot source without zero-shot": (["--zs_source", "offline"], 2, "--zs_source applies only", False),
    "search log without search": (lambda t, m: ["--search_log", t / "log.jsonl"], 2,
                                  "--search_log applies only with a search", False),
    "search step without search": (["--search_step", "0.01"], 2, "--search_step applies only", False),
    "save format without a model to save": (["--save_format", "compressed", "--save_model", ""], 2,
                                            "--save_format applies only with --save_model", False),
    "absorption scale without absorption": (["--absorption_scale", "0.2"], 2, "--absorption_scale applies only",
                                            False),
    "another rule's parameter": (["--allocation", "uniform", "--owl_lambda", "0.1"], 2,
                                 "--owl_lambda is a parameter of --allocation owl, not of --allocation uniform",
                                 False),
    "another pruner's parameter": (["--sparsegpt_blocksize", "64"], 2,
                                   "--sparsegpt_blocksize is a parameter of --prune_method sparsegpt", False),
    "offload without a GPU": (["--offload"], 2, "--offload moves decoder blocks to a GPU", False),
    # every number a user types is range-checked
    "seed too large": (["--seed", "99999999999999999999999"], 2, "--seed 99999999999999999999999: must lie in",
                       False),
    "seed negative": (["--seed", "-1"], 2, "--seed -1: must lie in [0, 2^32)", False),
    "sparsegpt damping huge": (["--prune_method", "sparsegpt", "--sparsegpt_percdamp", "1e308"], 2,
                               "--sparsegpt_percdamp must lie in (0, 1]", False),
    "ria exponent huge": (["--prune_method", "ria", "--ria_exponent", "1e308"], 2, "--ria_exponent must lie in",
                          False),
    "dlp alpha huge": (["--allocation", "dlp", "--dlp_alpha", "1e308"], 2, "--dlp_alpha must lie in [0, 0.5]",
                       False),
    "owl threshold huge": (["--allocation", "owl", "--owl_m", "1e308"], 2, "--owl_m must lie in (0, 1000]", False),
    "absorption huge": (["--absorption", "1e308"], 2, "--absorption strength must lie in [0, 1]", False),
    "search tolerance huge": (["--beta", "search", "--search_tol", "1e308"], 2, "--search_tol 1e+308: must lie in",
                              False),
    "search step tiny": (["--beta", "search", "--search_step", "1e-300"], 2, "--search_step 1e-300: the grid step",
                         False),
    "search coarse huge": (["--beta", "search", "--search_coarse", "1000000000"], 2, "at most 1000 points", False),
    "nan sparsity": (["--sparsity_ratio", "nan"], 2, "--sparsity_ratio: must be finite", False),
    # outputs the file system would refuse only at the end
    "results name too long": (lambda t, m: ["--results", t / ("r" * 300 + ".json")], 2, "--results", False),
    "save directory name too long": (lambda t, m: ["--save_model", t / ("m" * 300)], 2, "--save_model", False),
    "no room for the saved model": (lambda t, m: ["--save_model", t / "out" / "m", *no_room()], 2,
                                    "--save_model", False),
}


def edited_checkpoint(tmp, model_dir, drop: str | None = None, add: str | None = None):
    """The tiny LLaMA with one weight tensor removed from (or one extra tensor added to) its safetensors file."""
    import torch
    from safetensors.torch import load_file, save_file
    path = tmp / "ckpt-edited"
    shutil.copytree(model_dir("llama"), path)
    tensors = load_file(str(path / "model.safetensors"))
    if drop:
        del tensors[drop + ".weight"]
    if add:
        tensors[add] = torch.zeros(2, 2)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def compressed_checkpoint(tmp, model_dir, manifest=True):
    """A directory laid out as --save_format compressed writes it (identified by its manifest), or, without the
    manifest, as save_pretrained writes a model loaded from one (identified by config.json's quantization_config)."""
    path = tmp / "ckpt-compressed"
    shutil.copytree(model_dir("llama"), path)
    if manifest:
        (path / "sparse_manifest.json").write_text('{"format": "atp-bitmask-v1", "sparse_modules": {}}',
                                                   encoding="utf-8")
    else:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        config["quantization_config"] = {"quant_method": "atp_sparse", "format": "atp-bitmask-v2",
                                         "sparse_modules": []}
        (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def no_room():
    """Flags of nothing; makes the disk look full to the free-space check (patched by the test below)."""
    NO_ROOM.append(True)
    return []


NO_ROOM: list = []


@pytest.fixture(autouse=True)
def _disk_looks_full_when_asked(monkeypatch):
    NO_ROOM.clear()
    import lib.outputs.paths
    real = lib.outputs.paths.shutil.disk_usage

    def usage(path):
        total, used, free = real(path)
        return type(real(path))(total, used, 1024 if NO_ROOM else free)
    monkeypatch.setattr(lib.outputs.paths.shutil, "disk_usage", usage)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_loading_and_leaves_nothing(cli, model_dir, text_files, tmp_path, loads,
                                                                 monkeypatch, case):
    flags, code, fragment, loaded = CASES[case]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    flags = [str(f) for f in (flags(work, model_dir) if callable(flags) else flags)]
    base = ["--calib_data", text_files.calib, "--eval_data", text_files.eval, "--nsamples", "4", "--seqlen", "32",
            "--max_eval_windows", "2", "--quiet", "--results", work / "out" / "run.json",
            "--save_model", work / "out" / "model"]
    model = [] if "--model" in flags or "--demo" in flags else ["--model", model_dir("llama")]
    if "--demo" in flags:  # the demo brings its own data: keep only the outputs
        base = base[base.index("--quiet"):]
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    exit_code, out, err = cli(*model, *base, *flags)
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_code == code, (out, err)
    assert lines and lines[-1].startswith("error: ") and fragment in lines[-1], err
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in err
    assert bool(loads) == loaded, f"a model was{' not' if loaded else ''} loaded: {loads}"
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before  # nothing written, not even partly


def test_a_save_directory_filled_during_the_run_keeps_the_finished_model_beside_it(cli, model_dir, text_files,
                                                                                   tmp_path, monkeypatch):
    """Two runs saving to one --save_model: the second finds it taken only at the end; its work is not lost."""
    import lib.pruning.sequential as sequential
    target = tmp_path / "model"
    real = sequential.prune_sequential

    def prune_while_another_run_saves(*args, **kwargs):
        records = real(*args, **kwargs)
        target.mkdir()
        (target / "config.json").write_text("{}", encoding="utf-8")
        return records
    monkeypatch.setattr("lib.session.prune_sequential", prune_while_another_run_saves)
    code, out, err = cli("--model", model_dir("llama"), "--calib_data", text_files.calib, "--eval_data",
                         text_files.eval, "--nsamples", "4", "--seqlen", "32", "--max_eval_windows", "2", "--quiet",
                         "--save_model", target)
    assert code == 0, err
    assert (target / "config.json").read_text() == "{}"  # the other run's files are untouched
    beside = [p for p in tmp_path.iterdir() if p.name.startswith("model-")]
    assert len(beside) == 1 and (beside[0] / "model.safetensors").is_file()
    assert f"saved to {beside[0]}" in out
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


SLOW_SAVE = """
import sys, time
sys.path.insert(0, {repo!r})
from lib.outputs import save_model_atomic, termination_as_interrupt

class Slow:
    def save_pretrained(self, path, **kwargs):
        open(path + "/part.bin", "w").write("x")
        print("saving", flush=True)
        time.sleep(60)

with termination_as_interrupt():
    try:
        save_model_atomic(Slow(), Slow(), {target!r})
    except KeyboardInterrupt:
        sys.exit(130)
"""


def test_sigterm_during_a_save_leaves_no_temporary_directory(tmp_path):
    target = tmp_path / "out" / "model"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE.format(repo=str(REPO), target=str(target))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    assert any(".tmp-" in p.name for p in (tmp_path / "out").iterdir())  # mid-save: the temporary directory
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 130
    assert not (tmp_path / "out").exists()  # the temporary directory and the parent it created are gone


def test_a_log_line_cut_by_a_crash_does_not_swallow_the_next_record(tmp_path):
    from lib.search.strategies import search_beta
    log = tmp_path / "log.jsonl"
    search_beta(lambda b: 10 + b, 0.004, strategy="grid", step=0.002, log_path=str(log), key="k", progress=False)
    log.write_bytes(log.read_bytes()[:-7] + b"\xff\xfe")  # a crash mid-write, and a byte that is not UTF-8
    result = search_beta(lambda b: 10 + b, 0.006, strategy="grid", step=0.002, log_path=str(log), key="k",
                         progress=False)
    assert result.num_evaluated == 2  # the cut trial (0.004) and the new one (0.006)
    again = search_beta(lambda b: 10 + b, 0.006, strategy="grid", step=0.002, log_path=str(log), key="k",
                        progress=False)
    assert again.num_evaluated == 0  # both new records survived the broken line before them


def test_a_resumed_search_says_so_and_garbage_is_one_plain_warning(cli, tmp_path):
    flags = ["--demo", "--nsamples", "4", "--seqlen", "64", "--max_eval_windows", "2", "--quiet", "--beta",
             "search", "--search_step", "0.05", "--search_log", tmp_path / "log.jsonl"]
    code, out, err = cli(*flags)
    assert code == 0, err
    with open(tmp_path / "log.jsonl", "a", encoding="utf-8") as f:
        f.write("this is not json\n")
    code, out, err = cli(*flags)
    assert code == 0, err
    assert "resumed" in out and "trials from" in out
    assert "warning: " in err and "unreadable" in err and "UserWarning" not in err


def test_outputs_get_the_usual_permissions_not_private_temporary_ones(cli, model_dir, text_files, tmp_path):
    old = os.umask(0o022)
    try:
        code, _, err = cli("--model", model_dir("llama"), "--calib_data", text_files.calib, "--eval_data",
                           text_files.eval, "--nsamples", "4", "--seqlen", "32", "--max_eval_windows", "2",
                           "--quiet", "--results", tmp_path / "run.json", "--save_model", tmp_path / "model")
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "run.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "model" / "config.json").stat().st_mode & 0o777 == 0o644
