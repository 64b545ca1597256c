"""The CPR study: train every entry of the ``cpr_study`` preset for several seeds and score it.

    python bench/cpr_study.py run --seeds 0 1 --jobs 2 --out runs/cpr_study     # train + score
    python bench/cpr_study.py report --out runs/cpr_study                       # tables + figures

Each (seed, entry) is one ``cpl-train`` process (``--preset cpr_study`` with the entry's settings,
``threads: 1``), ``--jobs`` of them at a time; then the run is scored with the functions behind
``cpl-eval`` (``promptir`` protocol, per task, with the degraded inputs' scores as the baseline row)
and ``cpl-analyze`` (task-expert information per prompt level, and the prompt gap: PSNR with the
image's own prompts minus the mean PSNR with every other expert). Runs that already have their
``score.json`` are skipped, so an interrupted study continues where it stopped.
``report`` writes ``<name>_table.md``, ``<name>.json`` and ``<name>.png`` into ``--results`` (``--name``,
default ``cpr_study``; the prose around the table lives in ``<name>.md``).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MAIN = "paper"        # the preset's main run: SPM + CPR as the paper writes it
SCORE_FILE = "score.json"


def conditions() -> dict[str, dict[str, Any]]:
    """Entry name -> dotted settings, read from the preset (one source for the grid)."""
    from cpl_fast.config import flat_dotted, load_config

    config = load_config("cpr_study")
    return {MAIN: {}, **{name: flat_dotted(o) for name, o in config["baselines"].items()}}


def _yaml_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def train_command(name: str, settings: dict[str, Any], seed: int, run_dir: Path,
                  extra: list[str]) -> list[str]:
    sets = [f"seed={seed}", "baselines={}", "report.enabled=false", "eval.before_after=false", f"name={name}",
            *(f"{key}={_yaml_value(value)}" for key, value in settings.items()), *extra]
    # A folder without result.json is an interrupted run: start it again from scratch.
    again = ["--overwrite"] if run_dir.exists() else []
    return [sys.executable, "-m", "cpl_fast.cli.train", "--preset", "cpr_study", "--run-dir", str(run_dir),
            *again, *(arg for s in sets for arg in ("--set", s))]


GAP_STRIDE = 7       # prompt gap and output range on every 7th test image (10 of 70, every task twice:
                     # the embedded test split cycles through its five tasks)


def task_information(scores: dict[str, Any]) -> list[float]:
    """Per level, the task-expert mutual information (bits) from ``evaluate``'s per-task counts."""
    import torch

    from cpl_fast.metrics.routing import information_from_counts

    levels = len(next(iter(scores.values()))["levels"])
    return [information_from_counts([torch.tensor(s["levels"][level]["counts"]) for s in scores.values()])
            for level in range(levels)]


def score(run_dir: Path) -> dict[str, Any]:
    """PSNR/SSIM per task, task-expert information and prompt gap of a finished run."""
    import torch
    from torch.utils.data import Subset

    from cpl_fast.cli.eval import evaluation_set
    from cpl_fast.eval.prompt_gap import eval_prompt_gap
    from cpl_fast.eval.scoring import evaluate, score_inputs
    from cpl_fast.inference.restoration import restore_image
    from cpl_fast.metrics.protocols import average
    from cpl_fast.runs.loading import load_model

    torch.set_num_threads(1)
    loaded = load_model(run_dir)
    config = loaded.run_config
    dataset = evaluation_set(config)
    sample = Subset(dataset, range(0, len(dataset), GAP_STRIDE))
    model = loaded.model
    scores = evaluate(model, dataset, protocol="promptir")
    inputs = score_inputs(dataset, protocol="promptir")
    result = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    history = result["history"]
    tail = history[-30:]

    def mean_of(key: str, rows: list[dict[str, Any]]) -> float | None:
        values = [h[key] for h in rows if key in h and h[key] is not None and math.isfinite(h[key])]
        return sum(values) / len(values) if values else None

    out: dict[str, Any] = {
        "name": config["name"], "seed": config["seed"], "steps": result["steps"], "wall_s": result["wall_s"],
        "psnr": {task: s["psnr"] for task, s in scores.items()},
        "ssim": {task: s["ssim"] for task, s in scores.items()},
        "average": average(scores), "inputs": {task: s["psnr"] for task, s in inputs.items()},
        "inputs_average": average(inputs),
        "train": {key: mean_of(key, tail) for key in ("l1", "cpr", "l_pos", "l_neg", "prompt_gap", "alpha")},
        "grad_ratio": mean_of("grad_ratio", history),
    }
    if getattr(model, "top_k", None) is not None:
        out["task_information"] = task_information(scores)
        out["prompt_gap"] = eval_prompt_gap(model, sample)["all"]
    # The range of the raw (unclipped) restorations: artefacts show up as values far outside [0, 1].
    raw = [restore_image(model, item["input"]).image for item in sample]
    out["output_range"] = [min(float(r.min()) for r in raw), max(float(r.max()) for r in raw)]
    return out


def run_one(name: str, settings: dict[str, Any], seed: int, out: Path, extra: list[str]) -> str:
    run_dir = out / f"seed{seed}" / name
    if (run_dir / SCORE_FILE).is_file():
        return f"{name} seed {seed}: done before"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{name}.log"
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        if not (run_dir / "result.json").is_file():
            subprocess.run(train_command(name, settings, seed, run_dir, extra), stdout=fh,
                           stderr=subprocess.STDOUT, check=True)
        subprocess.run([sys.executable, __file__, "score", str(run_dir)], stdout=fh, stderr=subprocess.STDOUT,
                       check=True)
    return f"{name} seed {seed}: {time.perf_counter() - started:.0f} s"


# ------------------------------------------------------------------------------------------ report

def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def collect(out: Path) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(out.glob(f"seed*/*/{SCORE_FILE}")):
        entry = json.loads(path.read_text(encoding="utf-8"))
        runs.setdefault(entry["name"], []).append(entry)
    return runs


def report(out: Path, results: Path, stem: str = "cpr_study") -> Path:
    runs = collect(out)
    if not runs:
        raise SystemExit(f"no scored runs under {out}")
    order = [name for name in conditions() if name in runs]
    tasks = sorted(next(iter(runs.values()))[0]["psnr"])
    reference = {e["seed"]: e["average"]["psnr"] for e in runs.get("spm_l1", [])}
    dense = {e["seed"]: e["average"]["psnr"] for e in runs.get("dense_l1", [])}
    rows = []
    for name in order:
        entries = sorted(runs[name], key=lambda e: e["seed"])
        avg = [e["average"]["psnr"] for e in entries]
        info = [max(e["task_information"]) for e in entries if e.get("task_information")]
        gaps = [e["prompt_gap"]["gap_db"] for e in entries if e.get("prompt_gap")]
        vs_l1 = [e["average"]["psnr"] - reference[e["seed"]] for e in entries if e["seed"] in reference]
        vs_dense = [e["average"]["psnr"] - dense[e["seed"]] for e in entries if e["seed"] in dense]
        rows.append({
            "name": name, "seeds": [e["seed"] for e in entries], "average_psnr": avg,
            "mean_psnr": _mean(avg), "std_psnr": statistics.pstdev(avg) if len(avg) > 1 else 0.0,
            "per_task": {t: _mean([e["psnr"][t] for e in entries]) for t in tasks},
            "vs_spm_l1": vs_l1, "vs_dense": vs_dense,
            "min_vs_spm_l1": min(vs_l1) if vs_l1 else None,
            "max_task_information": info, "prompt_gap_db": gaps,
            "grad_ratio": [e["grad_ratio"] for e in entries if e.get("grad_ratio") is not None],
            "output_range": [e["output_range"] for e in entries],
            "wall_s": _mean([e["wall_s"] for e in entries]),
        })
    results.mkdir(parents=True, exist_ok=True)
    payload = {"tasks": tasks, "inputs": next(iter(runs.values()))[0]["inputs"], "rows": rows}
    (results / f"{stem}.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    _figure(rows, results / f"{stem}.png")

    def fmt(values: list[float], digits: int = 2) -> str:
        return " / ".join(f"{v:+.{digits}f}" if v is not None else "-" for v in values) if values else "-"

    lines = ["| entry | avg PSNR (mean ± sd) | vs SPM-L1 per seed | vs dense per seed | "
             + " | ".join(tasks)
             + " | task info max (bits) | prompt gap (dB) | |grad CPR|/|grad L1| | s/run |",
             "|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|"]
    for r in rows:
        info = " / ".join(f"{v:.2f}" for v in r["max_task_information"]) or "-"
        gaps = " / ".join(f"{v:.1f}" for v in r["prompt_gap_db"]) or "-"
        ratio = " / ".join(f"{v:.2f}" for v in r["grad_ratio"]) or "-"
        lines.append(f"| {r['name']} | {r['mean_psnr']:.2f} ± {r['std_psnr']:.2f} | {fmt(r['vs_spm_l1'])} | "
                     f"{fmt(r['vs_dense'])} | " + " | ".join(f"{r['per_task'][t]:.2f}" for t in tasks)
                     + f" | {info} | {gaps} | {ratio} | {r['wall_s']:.0f} |")
    path = results / f"{stem}_table.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 0.32 * len(rows) + 1.5), sharey=True)
    names = [r["name"] for r in rows][::-1]
    for y, name in enumerate(names):
        r = next(r for r in rows if r["name"] == name)
        axes[0].scatter(r["average_psnr"], [y] * len(r["average_psnr"]), color="tab:blue", s=14)
        axes[0].plot([r["mean_psnr"]] * 2, [y - 0.3, y + 0.3], color="black")
        if r["max_task_information"]:
            axes[1].scatter(r["max_task_information"], [y] * len(r["max_task_information"]),
                            color="tab:orange", s=14)
    for name in ("spm_l1", "dense_l1"):
        r = next((r for r in rows if r["name"] == name), None)
        if r is not None:
            axes[0].axvline(r["mean_psnr"], ls="--", lw=0.8, color="grey")
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    axes[0].set_xlabel("average PSNR over the test sets (dB; dots: seeds, bar: mean)")
    axes[1].set_xlabel("task-expert information, best prompt level (bits)")
    axes[1].axvline(0.1, ls="--", lw=0.8, color="grey")
    fig.suptitle("CPR study (tiny model, embedded data, 150 steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and score the grid")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    run.add_argument("--jobs", type=int, default=2)
    run.add_argument("--out", type=Path, default=Path("runs/cpr_study"))
    run.add_argument("--only", nargs="+", help="entries to run (default: all)")
    run.add_argument("--set", action="append", default=[], dest="extra", metavar="KEY=VALUE",
                     help="extra setting for every run (e.g. train.iterations=20 for a smoke test)")
    one = sub.add_parser("score", help="score one finished run folder (writes score.json)")
    one.add_argument("run_dir", type=Path)
    rep = sub.add_parser("report", help="tables and figures from the scored runs")
    rep.add_argument("--out", type=Path, default=Path("runs/cpr_study"))
    rep.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    rep.add_argument("--name", default="cpr_study", help="file name stem of the tables and figure")
    args = parser.parse_args(argv)

    if args.command == "score":
        from cpl_fast.data.io import atomic_write_bytes

        atomic_write_bytes(args.run_dir / SCORE_FILE, json.dumps(score(args.run_dir), indent=1).encode())
        return 0
    if args.command == "report":
        print(report(args.out, args.results, args.name).read_text(encoding="utf-8"))
        return 0
    grid = conditions()
    unknown = sorted(set(args.only or []) - set(grid))
    if unknown:
        parser.error(f"unknown entries {unknown}; known: {', '.join(grid)}")
    names = args.only or list(grid)
    # In the order given (--only) or the preset's; the seeds of one entry side by side.
    jobs = [(seed, name) for name in names for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, name, grid[name], seed, args.out, args.extra) for seed, name in jobs]
        for future in futures:
            print(future.result(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
