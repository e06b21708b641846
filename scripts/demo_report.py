"""The evaluation-report demo: SmolLM2-135M compressed several ways, each run with perplexity on the Lee
evaluation text and accuracy on a local multiple-choice task made from that text (lm-eval), speed for
some; then `sparsellm compare` over all runs and Chromium screenshots of the pages. Outputs in runs/.

Small settings keep each run to minutes on 2 shared cores: 8 calibration windows of 256 tokens,
8 evaluation chunks of 256 tokens, 20 task examples (80 log-likelihoods); the dense model is evaluated
("before") in one run only, whose report is looked at (the dense values are the same in every run).

    python scripts/demo_report.py [--out runs] [--data data] [--only NAME,NAME]"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RUNS = {  # name: (stages, evaluate the dense model too, measure speed)
    "magnitude-50": ([{"prune": {"method": "magnitude", "sparsity": 0.5}}], False, False),
    "wanda-50": ([{"prune": {"method": "wanda", "sparsity": 0.5}}], False, False),
    "wanda-2of4": ([{"prune": {"method": "wanda", "pattern": "2:4"}}], True, True),
    "sparsegpt-50": ([{"prune": {"method": "sparsegpt", "sparsity": 0.5}}], False, False),
    "slicegpt-20": ([{"slice": {"method": "slicegpt", "slicing": 0.2, "rotation": "uniform", "round_to": 1}}], False, True),
}


def shot(html: Path, png: Path, size: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={size}",
                        html.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    print("screenshot", png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs"))
    ap.add_argument("--data", default=str(ROOT / "data"))  # bash scripts/get_demo_data.sh
    ap.add_argument("--only", help="comma-separated run names (default: all)")
    args = ap.parse_args()
    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    from sparsellm.evaluate.zeroshot import continuation_task

    continuation_task(data / "lee_eval.txt", out / "tasks", name="lee_continuation", n=200, words=12, seed=0)
    names = args.only.split(",") if args.only else list(RUNS)
    for name in names:
        stages, before, speed = RUNS[name]
        recipe = {"seed": 0, "calibration": {"dataset": str(data / "lee_calib.txt"), "nsamples": 8, "seqlen": 256},
                  "evaluation": {"ppl": [str(data / "lee_eval.txt")], "limit": 8, "before": before,
                                 "tasks": ["lee_continuation"], "task_paths": [str(out / "tasks")], "task_limit": 20,
                                 "speed": {"prefill_tokens": 256, "decode_prompt": 32, "decode_tokens": 32,
                                           "repeats": 3} if speed else None},
                  "stages": stages}
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        with open(out / f"{name}.log", "w") as log:
            r = subprocess.run([sys.executable, "-m", "sparsellm", "prune", "--model", "smollm2-135m", "--recipe",
                                str(path), "--output", str(out / name), "--overwrite"], stdout=subprocess.PIPE,
                               stderr=log, text=True)
        print(name, r.stdout.strip() or f"failed ({r.returncode}), see {name}.log", flush=True)
    done = [out / n for n in RUNS if (out / n / "report.json").is_file()]
    subprocess.run([sys.executable, "-m", "sparsellm", "compare", *map(str, done), "--output", str(out / "compare.html")],
                   check=True)
    if shutil.which("chromium"):
        for n in ("wanda-2of4", "slicegpt-20"):
            if (out / n / "report.html").is_file():
                shot(out / n / "report.html", out / f"report-{n}.png", "1200,2000")
        shot(out / "compare.html", out / "compare.png", "1300,1500")


if __name__ == "__main__":
    main()
