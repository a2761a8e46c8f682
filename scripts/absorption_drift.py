"""How much a perturbation injected after each decoder block grows or shrinks by the time it reaches the model's
output: relative L2 drift against depth, for a small and a large perturbation.

The seed paper ("Beyond Layer Importance in Layer-wise Sparsity: An Inter-Layer Perturbation-Absorption
Perspective") reports that early blocks amplify a pruning-sized perturbation while middle and late blocks absorb
it (drift falling with depth), and that absorption appears only for large perturbations. This script measures the
same quantity on any model with lib.allocation.absorption.measure_drift (seeded Gaussian noise of exactly
`scale` times each token's norm, drift = mean per-token ||h' - h|| / ||h||, two blocks later and after the final
norm) and prints, writes and draws it, so the claim can be checked rather than assumed:

  python scripts/absorption_drift.py --demo real --scales 0.05,0.5 --out out/drift
  python scripts/absorption_drift.py --model ./llama --scales 0.05,0.5 --batches 4 --out out/drift

A ratio drift/scale above 1 means the blocks after the injection amplified the perturbation, below 1 that they
absorbed it. Flags after `--` go to main.py's parser (data, sizes, device, dtype).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from lib.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="absorption_drift.py", description=__doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="hub id, local model directory or .gguf file (as main.py --model)")
    model.add_argument("--demo", nargs="?", const="tiny", choices=["tiny", "real"], help="as main.py --demo")
    p.add_argument("--scales", default="0.05,0.5",
                   help="relative perturbation sizes, comma-separated (default: a pruning-sized and a large one)")
    p.add_argument("--batches", type=int, default=2, help="calibration batches to average over")
    p.add_argument("--lookahead", type=int, default=2, help="blocks after the injection for the local drift")
    p.add_argument("--out", default="out/drift", help="prefix of the .json and .png outputs")
    return p


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--scales {text!r}: expected comma-separated numbers") from None
    if not scales or not all(math.isfinite(s) and 0 < s < 10 for s in scales):
        raise UserError(f"--scales {text!r}: each scale must lie in (0, 10)")
    return scales


def measure(args: argparse.Namespace, passthrough: list[str]) -> dict:
    import torch

    from lib import run as steps
    from lib.allocation.absorption import measure_drift
    from lib.calibration.blocks import capture_block_inputs, run_block
    from lib.cli import build_parser as main_parser, config_from_flags
    from lib.models.structure import final_norm

    scales = parse_scales(args.scales)
    if args.batches < 1 or args.lookahead < 1:
        raise UserError("--batches and --lookahead must be at least 1")
    model_flags = ["--model", args.model] if args.model else ["--demo", args.demo]
    # a rule that measures activations, so the calibration windows are loaded
    config = config_from_flags(main_parser().parse_args(model_flags + ["--allocation", "owl", "--quiet"]
                                                        + passthrough))
    config.validate()
    device, dtype = steps.prepare(config)
    loaded = steps.load_model(config, device, dtype)
    data, records = steps.load_data(config, loaded)
    ids = data.calib_ids[: data.calib_batch_size * args.batches]
    blocks = loaded.blocks
    with torch.no_grad():
        batches = capture_block_inputs(loaded.model, blocks, ids, data.calib_batch_size)
    index_of = {id(block): i for i, block in enumerate(blocks)}
    pairs = [(b.hidden, {"__batch__": b}) for b in batches]

    def run(block, hidden, kwargs):  # each block with its own call arguments
        return run_block(block, kwargs["__batch__"].at(index_of[id(block)], hidden))

    curves = {}
    for scale in scales:
        lookahead, final = measure_drift(list(blocks), pairs, run, final_norm(loaded.model, blocks), scale,
                                         lookahead=args.lookahead, seed=config.data.seed)
        curves[f"{scale:g}"] = {"scale": scale, "lookahead_drift": lookahead, "final_drift": final,
                                "final_ratio": [d / scale for d in final]}
    return {"model": loaded.name, "num_blocks": len(blocks), "lookahead": args.lookahead,
            "windows": int(ids.shape[0]), "seqlen": data.seqlen, "calibration": records["calibration"],
            "curves": curves}


def summary(result: dict) -> str:
    """One line per block: drift after the final norm divided by the injected size, for each scale."""
    scales = list(result["curves"])
    lines = [f"{result['model']}: drift at the output / injected size (>1 amplified, <1 absorbed)",
             "block  " + "  ".join(f"scale {s:>6}" for s in scales)]
    for i in range(result["num_blocks"]):
        lines.append(f"{i:5d}  " + "  ".join(f"{result['curves'][s]['final_ratio'][i]:12.3f}" for s in scales))
    for s in scales:
        ratios = result["curves"][s]["final_ratio"]
        third = max(1, len(ratios) // 3)
        early, late = sum(ratios[:third]) / third, sum(ratios[-third:]) / third
        lines.append(f"scale {s}: first third {early:.3f}, last third {late:.3f} "
                     f"({'falls' if late < early else 'rises'} with depth; "
                     f"{sum(r < 1 for r in ratios)} of {len(ratios)} blocks absorb)")
    return "\n".join(lines)


def plot(result: dict, path: str) -> bool:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for label, curve in result["curves"].items():
        depth = range(result["num_blocks"])
        ax.plot(depth, curve["final_ratio"], "o-", ms=3, label=f"scale {label}: at the output")
        ax.plot(depth, [d / curve["scale"] for d in curve["lookahead_drift"]], "--", lw=1,
                label=f"scale {label}: {result['lookahead']} blocks later")
    ax.axhline(1.0, color="gray", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("block where the perturbation is injected")
    ax.set_ylabel("relative drift / injected size")
    ax.set_title(f"perturbation absorption, {result['model']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, passthrough = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)

    def body() -> int:
        from lib.outputs import check_writable_file, write_json_atomic
        for suffix in (".json", ".png"):
            check_writable_file(args.out + suffix, "out")
        result = measure(args, passthrough)
        print(summary(result))
        write_json_atomic(args.out + ".json", result)
        drawn = plot(result, args.out + ".png")
        if not drawn:
            print("warning: matplotlib is not installed (pip install matplotlib): no plot drawn; the numbers are in "
                  f"{args.out}.json", file=sys.stderr)
        print(f"written to {args.out}.json{' and .png' if drawn else ''}")
        return 0
    from lib.cli import run_command
    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
