"""Zero-shot (or few-shot) accuracy through lm-evaluation-harness, on the model already in memory.

Task names resolve against lm-eval's built-in tasks (boolq, rte, hellaswag, ...) and any folders of
task YAMLs given as `task_paths`; a path to a task YAML works as a name too. Names are checked before
any expensive work. `continuation_task` writes a small local multiple-choice task from plain text
(which of 4 endings continues this passage), usable offline."""
from __future__ import annotations

import difflib
import functools
import json
import logging
import random
from pathlib import Path

from ..errors import DataError, RecipeError
from ..optional import require

log = logging.getLogger(__name__)

# the zero-shot suite of the Wanda / SparseGPT / SliceGPT papers; "suite" in a task list expands to it
PAPER_SUITE = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")


def expand(tasks: list[str]) -> list[str]:
    out = []
    for t in tasks:
        for name in (PAPER_SUITE if t == "suite" else [t]):
            if name not in out:
                out.append(name)
    return out


@functools.lru_cache(maxsize=8)
def _manager(paths: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=defaults)


def task_manager(tasks: list[str], task_paths: list[str] = ()):
    """A TaskManager that knows every task in `tasks`, or a RecipeError naming the unknown ones.
    lm-eval's built-in index (thousands of YAMLs, ~10 s) is only built when a name needs it."""
    require("lm_eval")  # before any model is loaded: the one-line install hint
    tasks = expand(tasks)
    paths = tuple(str(Path(p).resolve()) for p in task_paths)
    for p in paths:
        if not Path(p).is_dir():
            raise RecipeError(f"task folder not found: {p}; give a folder holding lm-eval task YAML files")
    local = [t for t in tasks if not _is_yaml(t)]
    tm = _manager(paths, False)
    if any(t not in tm.all_tasks for t in local):
        tm = _manager(paths, True)
    unknown = [t for t in local if t not in tm.all_tasks]
    for t in tasks:
        if _is_yaml(t) and not Path(t).is_file():
            raise RecipeError(f"task file not found: {t}; check the path to the lm-eval task YAML")
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, tm.all_tasks, n=3)
            hints.append(f"{t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise RecipeError(f"unknown lm-eval task {', '.join(hints)}; use a task name lm-eval knows "
                          f"(lm-eval ls tasks), 'suite' for {', '.join(PAPER_SUITE)}, or a task YAML file / --task-path folder")
    return tm, tasks


def _is_yaml(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))


def check_chat_template(tokenizer, model: str) -> None:
    """Refuse apply_chat_template for a tokenizer without a chat template, before any model work."""
    if not getattr(tokenizer, "chat_template", None):
        raise RecipeError(f"evaluation.apply_chat_template: the tokenizer of {model} has no chat template; "
                          "evaluate without --apply-chat-template (base models), or use the instruct model's tokenizer")


class TaskResults(dict):
    """summarize()'s {task: {metric: value, ...}}, carrying lm-eval's own results object as `raw` (written
    beside report.json by write_lm_eval_results)."""

    raw: dict | None = None


def evaluate_tasks(model, tokenizer, tasks: list[str], task_paths: list[str] = (), limit: int | None = None,
                   num_fewshot: int | None = 0, batch_size: int = 8, seed: int = 0,
                   apply_chat_template: bool = False) -> TaskResults:
    """Accuracy of an in-memory model on lm-eval tasks: {task: {acc, acc_stderr, acc_norm, ..., samples}},
    every metric and filter lm-eval reports. apply_chat_template: prompts through the tokenizer's chat
    template (instruct models), as lm-eval's --apply_chat_template."""
    tm, names = task_manager(tasks, task_paths)  # checks that lm-eval is installed first
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, num_fewshot=num_fewshot,
                                      task_manager=tm, log_samples=False, bootstrap_iters=1000,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed, apply_chat_template=apply_chat_template)
    except (ConnectionError, OSError, FileNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot get the data of lm-eval task(s) {', '.join(names)} ({first}); the hub is needed for "
                        "built-in tasks: connect once so datasets caches them, or use a local task YAML") from e
    res = TaskResults(summarize(out, tm))
    res.raw = {k: v for k, v in out.items() if k != "samples"}
    return res


def summarize(out: dict, tm=None) -> dict:
    """lm-eval's results as {task: {"acc": .., "acc_stderr": .., "samples": n, "dataset": ..}}: every metric
    and filter, "metric" for lm-eval's "metric,none" and "metric,filter" for the others (gsm8k's
    "exact_match,strict-match" and "exact_match,flexible-extract")."""
    res = {}
    for task, metrics in out["results"].items():
        row = {}
        for key, val in metrics.items():
            name, _, filt = key.partition(",")
            if isinstance(val, (int, float)) and not isinstance(val, bool) and filt:
                row[name if filt == "none" else f"{name},{filt}"] = float(val)
        n = out.get("n-samples", {}).get(task, {})
        row["samples"] = int(n.get("effective", n.get("original", 0)))
        cfg = out.get("configs", {}).get(task, {})
        row["dataset"] = {"path": cfg.get("dataset_path"), "name": cfg.get("dataset_name")}
        row["num_fewshot"] = out.get("n-shot", {}).get(task)
        res[task] = row
    return res


LM_EVAL_FILES = {"before": "lm_eval_results_before.json", "after": "lm_eval_results_after.json"}


def write_lm_eval_results(folder: Path, report: dict) -> list[str]:
    """lm-eval's own results JSON (as simple_evaluate returned it, without per-sample logs) for the
    before and after evaluations measured in this run; returns the file names written."""
    from lm_eval.utils import handle_non_serializable

    written = []
    for side, name in LM_EVAL_FILES.items():
        raw = getattr((report.get("zeroshot") or {}).get(side), "raw", None)
        if raw is not None:
            text = json.dumps(raw, indent=2, default=handle_non_serializable, ensure_ascii=False)
            (Path(folder) / name).write_text(text + "\n", encoding="utf-8")
            written.append(name)
    return written


def mean_accuracy(results: dict) -> float | None:
    accs = [r["acc"] for r in results.values() if "acc" in r]
    return sum(accs) / len(accs) if accs else None


def continuation_task(text_file: str | Path, folder: str | Path, name: str = "continuation", n: int = 200,
                      choices: int = 4, words: int = 12, seed: int = 0) -> Path:
    """Write a local multiple-choice task from plain text (one document per line): a passage of `words`
    words, and as choices its true next `words` words plus endings taken from other documents. Returns
    the task YAML; lm-eval reads the jsonl beside it through the `json` dataset builder, no network."""
    rng = random.Random(seed)
    docs = [d.split() for d in Path(text_file).read_text(encoding="utf-8").splitlines()]
    docs = [d for d in docs if len(d) >= 2 * words]
    if len(docs) < choices:
        raise DataError(f"{text_file} has fewer than {choices} documents of {2 * words}+ words; give more text")
    rows = []
    for _ in range(n):
        i = rng.randrange(len(docs))
        start = rng.randrange(len(docs[i]) - 2 * words + 1)
        context = " ".join(docs[i][start:start + words])
        true = " ".join(docs[i][start + words:start + 2 * words])
        others = []
        for j in rng.sample([k for k in range(len(docs)) if k != i], choices - 1):
            s = rng.randrange(len(docs[j]) - words + 1)
            others.append(" ".join(docs[j][s:s + words]))
        label = rng.randrange(choices)
        endings = others[:label] + [true] + others[label:]
        rows.append({"context": context, "endings": endings, "label": label})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    yaml_path = folder / f"{name}.yaml"
    yaml_path.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        "doc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{endings}}\"\n"
        "doc_to_target: label\n"
        "target_delimiter: \" \"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n", encoding="utf-8")
    return yaml_path
