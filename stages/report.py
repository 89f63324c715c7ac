"""Stage `report`: compare the variants listed in params.yaml `variants`, from files only.

Reads each variant's metrics/evaluate, metrics/generate and metrics/cost files and its
predictions and per-dialogue scores, and writes metrics/report.md (quality and cost side by side,
significance in words, examples), metrics/rouge_plot.json (ROUGE per variant, a bar chart),
metrics/frontier.json (ROUGE-L with its interval against trainable parameters, Pareto-optimal
variants marked) and data/per_dialogue.jsonl (every variant's summary and ROUGE per dialogue).
Only the listed variants are read, so a subset run (`-S 'variants=[base,lora,lead]'`) reports
what it ran.
"""

from __future__ import annotations

import json
from pathlib import Path

from tabulate import tabulate

from stages.errors import run_stage
from stages.jsonio import read_json, read_jsonl, write_json
from stages.params import UNTRAINED, load_params
from stages.rouge import ROUGE_TYPES, holm_adjust, paired_test

LABELS = {
    "base": "original (zero-shot)",
    "lead": "lead baseline",
    "full": "full fine-tuning",
    "lora": "LoRA",
    "ia3": "IA3",
    "prompt": "prompt tuning",
}  # any other variant is shown by its name
EVALUATE_DIR = Path("metrics/evaluate")
GENERATE_DIR = Path("metrics/generate")
COST_DIR = Path("metrics/cost")
PREDICTIONS_DIR = Path("data/predictions")
REFERENCES_FILE = Path("data/prepared/references.jsonl")
SCORES_DIR = Path("data/scores")
BASE_MODEL_FILE = Path("metrics/base_model.json")
REPORT_FILE = Path("metrics/report.md")
PLOT_FILE = Path("metrics/rouge_plot.json")
FRONTIER_FILE = Path("metrics/frontier.json")
PER_DIALOGUE_FILE = Path("data/per_dialogue.jsonl")
SIGNIFICANCE = 0.05  # family-wise error rate over all comparisons together (Holm)


def label(variant: str) -> str:
    return LABELS.get(variant, variant)


def comparison_pairs(variants: list[str]) -> list[tuple[str, str]]:
    """Which paired tests to run: every trained variant against the original model and against
    full fine-tuning (the claim under test: PEFT loses little to it), and the original against
    the lead baseline."""
    trained = [v for v in variants if v not in UNTRAINED]
    pairs = [(v, "base") for v in trained if "base" in variants]
    pairs += [(v, "full") for v in trained if v != "full" and "full" in variants]
    pairs += [("base", "lead")] if {"base", "lead"} <= set(variants) else []
    return pairs


def comparisons(scores: dict[str, list[dict]], pairs: list[tuple[str, str]], resamples: int, seed: int) -> list[dict]:
    """Paired tests on per-dialogue multi-reference ROUGE-L (x100) for each (a, b) in `pairs`.

    Each result has the raw `p_value` and `p_holm`, Holm-adjusted over all pairs.
    """
    results = []
    for a, b in pairs:
        test = paired_test([r["rougeL"] for r in scores[a]], [r["rougeL"] for r in scores[b]], resamples, seed)
        results.append({"a": a, "b": b, **{k: (100 * v if k != "p_value" else v) for k, v in test.items()}})
    # Several tests at 0.05 each would call a difference significant by chance far more often than
    # 5% of the time; Holm's adjustment keeps that chance at SIGNIFICANCE for the whole family.
    for result, p_holm in zip(results, holm_adjust([r["p_value"] for r in results]) if results else []):
        result["p_holm"] = p_holm
    return results


def comparison_sentence(result: dict) -> str:
    a, b = label(result["a"]), label(result["b"])
    span = (
        f"{result['diff']:+.2f} ROUGE-L points, 95% CI [{result['ci_low']:+.2f}, {result['ci_high']:+.2f}], "
        f"p = {result['p_value']:.4f}, Holm-adjusted p = {result['p_holm']:.4f}"
    )
    if result["p_holm"] < SIGNIFICANCE:
        direction = "better" if result["diff"] > 0 else "worse"
        return f"- **{a}** is significantly {direction} than **{b}** ({span})."
    return f"- **{a}** vs **{b}**: no significant difference ({span})."


def rouge_table(variants: list[str], evaluation: dict[str, dict], suffix: str) -> str:
    """One row per variant: ROUGE (x100) and the change in ROUGE-L against the original model."""
    rows = []
    for variant in variants:
        scores = evaluation[variant]
        versus_base = (
            f"{scores[f'rougeL{suffix}'] - evaluation['base'][f'rougeL{suffix}']:+.2f}" if "base" in evaluation else "-"
        )
        rows.append([label(variant), *(f"{scores[f'{t}{suffix}']:.2f}" for t in ROUGE_TYPES), versus_base])
    headers = ["model", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum", "ROUGE-L vs original"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def interval_table(variants: list[str], evaluation: dict[str, dict]) -> str:
    rows = [
        [
            label(v),
            *(
                f"{evaluation[v][t]:.2f} [{evaluation[v][f'{t}_ci_low']:.2f}, {evaluation[v][f'{t}_ci_high']:.2f}]"
                for t in ROUGE_TYPES
            ),
        ]
        for v in variants
    ]
    return tabulate(rows, headers=["model", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum"], tablefmt="github")


def pareto_optimal(points: dict[str, tuple[float, float]]) -> set[str]:
    """Variants no other variant beats: none has at most their cost and at least their quality,
    with one of the two strictly better. `points` maps variant -> (cost, quality)."""
    return {
        v
        for v, (cost, quality) in points.items()
        if not any(c <= cost and q >= quality and (c, q) != (cost, quality) for c, q in points.values())
    }


def frontier_rows(variants: list[str], evaluation: dict[str, dict], cost: dict[str, dict]) -> list[dict]:
    """Trained variants only (the original and lead train nothing: no point on a log axis)."""
    trained = [v for v in variants if cost[v]["trainable_params"] > 0]
    optimal = pareto_optimal({v: (cost[v]["trainable_params"], evaluation[v]["rougeL"]) for v in trained})
    return [
        {
            "variant": v,
            "trainable_params": cost[v]["trainable_params"],
            "rougeL": evaluation[v]["rougeL"],
            "rougeL_ci_low": evaluation[v]["rougeL_ci_low"],
            "rougeL_ci_high": evaluation[v]["rougeL_ci_high"],
            "pareto": "Pareto-optimal" if v in optimal else "dominated",
        }
        for v in trained
    ]


def cost_table(variants: list[str], evaluation: dict[str, dict], cost: dict[str, dict], frontier: list[dict]) -> str:
    """Quality and cost side by side, one row per variant."""
    pareto = {row["variant"]: row["pareto"] == "Pareto-optimal" for row in frontier}
    rows = []
    for v in variants:
        c, memory = cost[v], next((k for k in cost[v] if k.startswith("peak_")), None)
        rows.append(
            [
                label(v),
                f"{evaluation[v]['rougeL']:.2f} [{evaluation[v]['rougeL_ci_low']:.2f}, {evaluation[v]['rougeL_ci_high']:.2f}]",
                f"{c['trainable_params']:,} ({c['trainable_percent']:.2f}%)",
                f"{c['saved_mb']:.1f}",
                f"{c['train_runtime_s'] / 60:.1f} min",
                f"{c[memory]:,.0f} ({'GPU' if memory == 'peak_gpu_memory_mb' else 'RSS'})" if memory else "-",
                f"{c['generation_dialogues_per_second']:.2f}",
                ("yes" if pareto[v] else "no") if v in pareto else "-",
            ]
        )
    headers = [
        "model",
        "ROUGE-L [95% CI]",
        "trainable params",
        "saved MB",
        "train time",
        "peak train memory MB",
        "dialogues/s generated",
        "Pareto-optimal",
    ]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def diagnostics_table(variants: list[str], generation: dict[str, dict], evaluation: dict[str, dict]) -> str:
    rows = [
        [
            label(v),
            evaluation[v]["dialogues"],
            evaluation[v]["references"],
            generation[v]["gen_mean_tokens"],
            f"{100 * generation[v]['gen_hit_max_share']:.1f}%",
        ]
        for v in variants
        if v != "lead"
    ]
    return tabulate(
        rows,
        headers=["model", "dialogues", "references", "mean generated tokens", "hit max_new_tokens"],
        tablefmt="github",
    )


def examples_section(
    variants: list[str], predictions: dict[str, list[dict]], references: dict[str, list[str]], count: int
) -> str:
    first = predictions[variants[0]]
    blocks = []
    for index in range(min(count, len(first))):
        row = first[index]
        lines = [f"### {row['id']}", "", "```", row["dialogue"], "```", "", f"- **human**: {references[row['id']][0]}"]
        lines += [f"- **{label(v)}**: {predictions[v][index]['prediction']}" for v in variants]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def per_dialogue_rows(
    variants: list[str],
    predictions: dict[str, list[dict]],
    scores: dict[str, list[dict]],
    references: dict[str, list[str]],
) -> list[dict]:
    rows = []
    for index, first in enumerate(predictions[variants[0]]):
        row = {"id": first["id"], "references": references[first["id"]]}
        for v in variants:
            row[f"{v}_summary"] = predictions[v][index]["prediction"]
            row.update({f"{v}_{t}": scores[v][index][t] for t in ROUGE_TYPES})
        rows.append(row)
    return rows


def plot_rows(variants: list[str], evaluation: dict[str, dict]) -> list[dict]:
    return [{"variant": v, **{t: evaluation[v][t] for t in ROUGE_TYPES}} for v in variants]


def render(
    variants: list[str],
    evaluation: dict[str, dict],
    generation: dict[str, dict],
    cost: dict[str, dict],
    tests: list[dict],
    frontier: list[dict],
    base_model: dict,
    examples: str,
) -> str:
    return (
        "\n\n".join(
            [
                "# FLAN-T5 on DialogSum: " + " vs ".join(label(v) for v in variants),
                f"Base model `{base_model['base_model_name']}` at revision `{base_model['base_model_revision']}` "
                f"(resolved: `{base_model['base_model_resolved_revision']}`). ROUGE F-measures x100 on the test split, "
                "one generated summary per unique dialogue.",
                "## Quality and cost",
                "Trainable params, adapter or model size on disk, whole-run train wall time (across resumes), peak "
                "memory while training (GPU: torch.cuda.max_memory_allocated; CPU: the process's peak RSS) and generation "
                "throughput. Train time and memory are measured, so they vary from run to run. Pareto-optimal: no other "
                "trained variant has as few trainable params and as high a ROUGE-L.",
                cost_table(variants, evaluation, cost, frontier),
                "## Multi-reference ROUGE (best reference per ROUGE type)",
                rouge_table(variants, evaluation, ""),
                "## Mean over references (comparable to per-row numbers reported elsewhere)",
                rouge_table(variants, evaluation, "_mean_ref"),
                "## 95% bootstrap confidence intervals (multi-reference, resampling dialogues)",
                interval_table(variants, evaluation),
                f"## Paired tests on ROUGE-L (Holm-adjusted over {len(tests)} comparisons, family-wise error rate "
                f"{SIGNIFICANCE})",
                f"Paired sign-flip tests on per-dialogue multi-reference ROUGE-L. The p-values are Holm-adjusted over "
                f"the {len(tests)} comparisons, so the chance of wrongly calling any of them significant is at "
                f'most {SIGNIFICANCE} (family-wise error rate); "significantly" means Holm-adjusted p < {SIGNIFICANCE}. '
                f"Each line shows the raw p too; the 95% CIs (paired bootstrap of the mean difference) are not adjusted.",
                "\n".join(comparison_sentence(t) for t in tests) or "(fewer than two comparable variants)",
                "## Generation diagnostics",
                diagnostics_table(variants, generation, evaluation),
                "## Examples",
                examples,
            ]
        )
        + "\n"
    )


def main() -> None:
    params = load_params()
    variants = params.variants
    evaluation = {v: read_json(EVALUATE_DIR / f"{v}.json") for v in variants}
    generation = {v: read_json(GENERATE_DIR / f"{v}.json") for v in variants}
    cost = {v: read_json(COST_DIR / f"{v}.json") for v in variants}
    predictions = {v: read_jsonl(PREDICTIONS_DIR / f"{v}.jsonl") for v in variants}
    scores = {v: read_jsonl(SCORES_DIR / f"{v}.jsonl") for v in variants}
    references = {row["id"]: row["references"] for row in read_jsonl(REFERENCES_FILE)}
    tests = comparisons(scores, comparison_pairs(variants), params.evaluate.bootstrap_resamples, params.seed)
    frontier = frontier_rows(variants, evaluation, cost)
    examples = examples_section(variants, predictions, references, params.report.examples)
    REPORT_FILE.write_text(
        render(variants, evaluation, generation, cost, tests, frontier, read_json(BASE_MODEL_FILE), examples)
    )
    write_json(plot_rows(variants, evaluation), PLOT_FILE)
    write_json(frontier, FRONTIER_FILE)
    PER_DIALOGUE_FILE.parent.mkdir(parents=True, exist_ok=True)
    PER_DIALOGUE_FILE.write_text(
        "".join(
            json.dumps(r, ensure_ascii=False) + "\n"
            for r in per_dialogue_rows(variants, predictions, scores, references)
        )
    )


if __name__ == "__main__":
    run_stage(main)
