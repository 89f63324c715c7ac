"""Stage `report`: compare the variants from their metrics and prediction files only.

Writes metrics/report.md (tables, significance in words, side-by-side examples),
metrics/rouge_plot.json (one row per variant for the `dvc plots` bar chart) and
data/per_dialogue.jsonl (every variant's summary and ROUGE per test dialogue, to sort by
worst cases).
"""

from __future__ import annotations

import json
from pathlib import Path

from tabulate import tabulate

from stages.errors import run_stage
from stages.params import load_params
from stages.rouge import ROUGE_TYPES, holm_adjust, paired_test

VARIANTS = ("base", "full", "lora", "lead")  # same names as the evaluate stage's foreach keys
TRAINED = ("full", "lora")
LABELS = {"base": "original (zero-shot)", "full": "full fine-tuning", "lora": "LoRA", "lead": "lead baseline"}
COMPARISONS = (("full", "base"), ("lora", "base"), ("full", "lora"), ("base", "lead"))
EVALUATE_DIR = Path("metrics/evaluate")
PREDICTIONS_DIR = Path("data/predictions")
TRAIN_METRICS = {"full": Path("metrics/train/full.json"), "lora": Path("metrics/train/lora.json")}
TRAIN_COSTS = {"full": Path("metrics/timing/train_full.json"), "lora": Path("metrics/timing/train_lora.json")}
REPORT_FILE = Path("metrics/report.md")
PLOT_FILE = Path("metrics/rouge_plot.json")
PER_DIALOGUE_FILE = Path("data/per_dialogue.jsonl")
SIGNIFICANCE = 0.05  # family-wise error rate over all COMPARISONS together (Holm)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def rouge_table(evaluation: dict[str, dict], training: dict[str, dict], suffix: str) -> str:
    """One row per variant: ROUGE (x100), change in ROUGE-L vs base, trainable params, train time."""
    rows = []
    for variant in VARIANTS:
        scores = evaluation[variant]
        train = training.get(variant, {})
        rows.append([
            LABELS[variant],
            *(f"{scores[f'{t}{suffix}']:.2f}" for t in ROUGE_TYPES),
            f"{scores[f'rougeL{suffix}'] - evaluation['base'][f'rougeL{suffix}']:+.2f}",
            f"{train['trainable_params']:,} ({train['trainable_percent']:.2f}%)" if train else "-",
            f"{train['train_runtime_s'] / 60:.1f} min" if train else "-",
        ])
    headers = ["model", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum", "ROUGE-L vs base",
               "trainable params", "train time"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def interval_table(evaluation: dict[str, dict]) -> str:
    rows = [[LABELS[v], *(f"{evaluation[v][t]:.2f} [{evaluation[v][f'{t}_ci_low']:.2f}, "
                          f"{evaluation[v][f'{t}_ci_high']:.2f}]" for t in ROUGE_TYPES)] for v in VARIANTS]
    return tabulate(rows, headers=["model", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum"], tablefmt="github")


def diagnostics_table(evaluation: dict[str, dict]) -> str:
    rows = [[LABELS[v], evaluation[v]["dialogues"], evaluation[v]["references"], evaluation[v]["gen_mean_tokens"],
             f"{100 * evaluation[v]['gen_hit_max_share']:.1f}%"] for v in VARIANTS if v != "lead"]
    return tabulate(rows, headers=["model", "dialogues", "references", "mean generated tokens",
                                   "hit max_new_tokens"], tablefmt="github")


def comparisons(predictions: dict[str, list[dict]], resamples: int, seed: int) -> list[dict]:
    """Paired tests on per-dialogue multi-reference ROUGE-L for each pair in COMPARISONS.

    Each result has the raw `p_value` and `p_holm`, Holm-adjusted over all COMPARISONS.
    """
    results = []
    for a, b in COMPARISONS:
        test = paired_test([r["rougeL"] for r in predictions[a]], [r["rougeL"] for r in predictions[b]],
                           resamples, seed)
        results.append({"a": a, "b": b, **{k: (100 * v if k != "p_value" else v) for k, v in test.items()}})
    # Four tests at 0.05 each would call a difference significant by chance far more often than
    # 5% of the time; Holm's adjustment keeps that chance at SIGNIFICANCE for the whole family.
    for result, p_holm in zip(results, holm_adjust([r["p_value"] for r in results])):
        result["p_holm"] = p_holm
    return results


def comparison_sentence(result: dict) -> str:
    a, b = LABELS[result["a"]], LABELS[result["b"]]
    span = f"{result['diff']:+.2f} ROUGE-L points, 95% CI [{result['ci_low']:+.2f}, {result['ci_high']:+.2f}], " \
           f"p = {result['p_value']:.4f}, Holm-adjusted p = {result['p_holm']:.4f}"
    if result["p_holm"] < SIGNIFICANCE:
        direction = "better" if result["diff"] > 0 else "worse"
        return f"- **{a}** is significantly {direction} than **{b}** ({span})."
    return f"- **{a}** vs **{b}**: no significant difference ({span})."


def examples_section(predictions: dict[str, list[dict]], count: int) -> str:
    blocks = []
    for index in range(min(count, len(predictions["base"]))):
        row = predictions["base"][index]
        lines = [f"### {row['id']}", "", "```", row["dialogue"], "```", "",
                 f"- **human**: {row['references'][0]}"]
        lines += [f"- **{LABELS[v]}**: {predictions[v][index]['prediction']}" for v in VARIANTS]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def per_dialogue_rows(predictions: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for index, base_row in enumerate(predictions["base"]):
        row = {"id": base_row["id"], "references": base_row["references"]}
        for variant in VARIANTS:
            record = predictions[variant][index]
            row[f"{variant}_summary"] = record["prediction"]
            row.update({f"{variant}_{t}": record[t] for t in ROUGE_TYPES})
        rows.append(row)
    return rows


def plot_rows(evaluation: dict[str, dict]) -> list[dict]:
    return [{"variant": v, **{t: evaluation[v][t] for t in ROUGE_TYPES}} for v in VARIANTS]


def render(evaluation: dict[str, dict], training: dict[str, dict], tests: list[dict], examples: str) -> str:
    return "\n\n".join([
        "# FLAN-T5 on DialogSum: original vs full fine-tuning vs LoRA",
        "ROUGE F-measures x100 on the test split, one generated summary per unique dialogue.",
        "## Multi-reference ROUGE (best reference per ROUGE type)",
        rouge_table(evaluation, training, ""),
        "## Mean over references (comparable to per-row numbers reported elsewhere)",
        rouge_table(evaluation, training, "_mean_ref"),
        "## 95% bootstrap confidence intervals (multi-reference, resampling dialogues)",
        interval_table(evaluation),
        f"## Paired tests on ROUGE-L (Holm-adjusted over {len(tests)} comparisons, family-wise error rate "
        f"{SIGNIFICANCE})",
        f"Paired sign-flip tests on per-dialogue multi-reference ROUGE-L. The p-values are Holm-adjusted over "
        f"the {len(tests)} comparisons, so the chance of wrongly calling any of them significant is at "
        f"most {SIGNIFICANCE} (family-wise error rate); \"significantly\" means Holm-adjusted p < {SIGNIFICANCE}. "
        f"Each line shows the raw p too; the 95% CIs (paired bootstrap of the mean difference) are not adjusted.",
        "\n".join(comparison_sentence(t) for t in tests),
        "## Generation diagnostics",
        diagnostics_table(evaluation),
        "## Examples",
        examples,
    ]) + "\n"


def main() -> None:
    params = load_params()
    evaluation = {v: read_json(EVALUATE_DIR / f"{v}.json") for v in VARIANTS}
    training = {v: {**read_json(TRAIN_METRICS[v]), **read_json(TRAIN_COSTS[v])} for v in TRAINED}
    predictions = {v: read_jsonl(PREDICTIONS_DIR / f"{v}.jsonl") for v in VARIANTS}
    tests = comparisons(predictions, params.evaluate.bootstrap_resamples, params.seed)
    REPORT_FILE.write_text(render(evaluation, training, tests, examples_section(predictions, params.report.examples)))
    PLOT_FILE.write_text(json.dumps(plot_rows(evaluation), indent=2) + "\n")
    PER_DIALOGUE_FILE.parent.mkdir(parents=True, exist_ok=True)
    PER_DIALOGUE_FILE.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_dialogue_rows(predictions)))


if __name__ == "__main__":
    run_stage(main)
