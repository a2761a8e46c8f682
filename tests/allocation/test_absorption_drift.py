"""scripts/absorption_drift.py on the tiny demo: one curve per scale, one value per block, the ratios are the drift
divided by the injected size, and a small and a large perturbation give different curves."""
import json

import pytest

from conftest import load_script


def test_drift_curves_for_two_scales_are_written_printed_and_drawn(tmp_path, capsys):
    out = tmp_path / "drift"
    script = load_script("absorption_drift")
    assert script.main(["--demo", "--scales", "0.05,0.5", "--batches", "1", "--out", str(out), "--",
                        "--nsamples", "4", "--seqlen", "32"]) == 0
    result = json.loads((tmp_path / "drift.json").read_text())
    assert set(result["curves"]) == {"0.05", "0.5"}
    for curve in result["curves"].values():
        assert len(curve["final_drift"]) == len(curve["lookahead_drift"]) == result["num_blocks"] == 4
        assert curve["final_ratio"] == pytest.approx([d / curve["scale"] for d in curve["final_drift"]])
        assert all(d > 0 for d in curve["final_drift"])
    assert result["curves"]["0.05"]["final_drift"] != result["curves"]["0.5"]["final_drift"]
    printed = capsys.readouterr().out
    assert "block" in printed and "scale 0.05:" in printed and "blocks absorb" in printed
    assert (tmp_path / "drift.png").stat().st_size > 0


def test_a_bad_scale_is_one_error_line(tmp_path, capsys):
    assert load_script("absorption_drift").main(["--demo", "--scales", "0,abc", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --scales")
