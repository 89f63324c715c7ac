"""Stage `report`: compare the variants listed in params.yaml `variants`, from files only.

Reads each variant's metrics/evaluate, metrics/generate and metrics/cost files and its
predictions and per-dialogue scores, and writes metrics/report.md (quality and cost side by side,
significance in words, examples, the two images below), metrics/rouge_plot.json (ROUGE-L with its
interval per variant, a bar chart), metrics/frontier.json (every variant's ROUGE-L with its interval
against trainable parameters, Pareto-optimal variants marked, the zero-cost ones included),
metrics/plots/{rouge_by_variant,frontier}.png (those two plots rendered offline from the templates
`dvc plots show` uses) and data/per_dialogue.jsonl (every variant's summary and ROUGE per dialogue).
Only the listed variants are read, so a subset run (`-S 'variants=[lora]'`, beside the baselines) reports
what it ran.
"""

from __future__ import annotations

import json
from pathlib import Path

from tabulate import tabulate

from stages.aggregate import Variant, comparisons, evaluation_row, mean_row
from stages.curve_rows import curve_rows, write_curve_rows
from stages.errors import run_stage
from stages.frontier import frontier_rows, pareto_cell, pareto_optimal
from stages.jsonio import read_json, read_jsonl, write_json
from stages.labels import label, variant_labels
from stages.params import load_params
from stages.plots import fill, load_template, render_png
from stages.rouge import ROUGE_TYPES
from stages.run_lists import UNTRAINED
from stages.runs import run_name
from stages.tuning_report import selection_table, tuning_mismatches, tuning_sentence
from stages.verdict import SIGNIFICANCE, Verdict

__all__ = ["pareto_optimal"]  # tests and notebooks import it from here

EVALUATE_DIR = Path("metrics/evaluate")
GENERATE_DIR = Path("metrics/generate")
COST_DIR = Path("metrics/cost")
CURVES_DIR = Path("metrics/curves")  # each variant's training curves (stages/curve_rows.py draws them)
PREDICTIONS_DIR = Path("data/predictions")
REFERENCES_FILE = Path("data/prepared/references.jsonl")
SCORES_DIR = Path("data/scores")
BASE_MODEL_FILE = Path("metrics/base_model.json")
TUNING_FILE = Path("metrics/tuning.json")  # scripts/tune.py's picks; committed as "nothing tuned" until a grid ran
REPORT_FILE = Path("metrics/report.md")
PLOT_FILE = Path("metrics/rouge_plot.json")
FRONTIER_FILE = Path("metrics/frontier.json")
PLOTS_DIR = Path("metrics/plots")  # <plot name>.png, rendered from .dvc/plots/<plot name>.json
ROUGE_PLOT, FRONTIER_PLOT = "rouge_by_variant", "frontier"  # plot names in dvc.yaml's `plots:`
REVISION = "workspace"  # what DVC calls the working tree's rows
PER_DIALOGUE_FILE = Path("data/per_dialogue.jsonl")
INTERVALS = (
    "A trained method's score is the mean over its seeds. With one seed, the interval is a percentile bootstrap "
    "over test dialogues: it leaves training noise out. With two or more, it is a two-level bootstrap (seeds, then "
    "dialogues): the mean +- t x its bootstrap standard error, the seed level's variance corrected to unbiased and "
    "the degrees of freedom from Welch-Satterthwaite, since percentile intervals of a bootstrap over 2-3 seeds "
    "never reach past the seeds' own range. The baselines have no seed: their intervals resample dialogues."
)
BASELINES_GROUP, TRAINED_GROUP = "baselines (no training)", "trained"  # the ROUGE plot's two panels


def full_fine_tuning(variants: list[str], cost: dict[str, dict]) -> str | None:
    """The variant the PEFT methods are compared against: the first of type full (its section may have
    any name), or None."""
    return next((v for v in variants if cost[v].get("method_type") == "full"), None)


def comparison_pairs(variants: list[str], full: str | None = "full") -> list[tuple[str, str]]:
    """Which paired tests to run: every trained variant against the original model and against
    full fine-tuning (`full`, the claim under test: PEFT loses little to it), and the original
    against the lead baseline."""
    trained = [v for v in variants if v not in UNTRAINED]
    pairs = [(v, "base") for v in trained if "base" in variants]
    pairs += [(v, full) for v in trained if v != full and full in variants]
    pairs += [("base", "lead")] if {"base", "lead"} <= set(variants) else []
    return pairs


def comparison_sentence(result: dict, labels: dict[str, str] | None = None) -> str:
    a, b = label(result["a"], labels), label(result["b"], labels)
    span = (
        f"{result['diff']:+.2f} ROUGE-L points, 95% CI [{result['ci_low']:+.2f}, {result['ci_high']:+.2f}], "
        f"p = {result['p_value']:.4f}, Holm-adjusted p = {result['p_holm']:.4f}"
    )
    if result["p_holm"] < SIGNIFICANCE:
        direction = "better" if result["diff"] > 0 else "worse"
        return f"- **{a}** is significantly {direction} than **{b}** ({span})."
    return f"- **{a}** vs **{b}**: no significant difference ({span})."


def rouge_table(
    variants: list[str], evaluation: dict[str, dict], suffix: str, labels: dict[str, str] | None = None
) -> str:
    """One row per variant: ROUGE (x100) and the change in ROUGE-L against the original model."""
    rows = []
    for variant in variants:
        scores = evaluation[variant]
        versus_base = (
            f"{scores[f'rougeL{suffix}'] - evaluation['base'][f'rougeL{suffix}']:+.2f}" if "base" in evaluation else "-"
        )
        rows.append([label(variant, labels), *(f"{scores[f'{t}{suffix}']:.2f}" for t in ROUGE_TYPES), versus_base])
    headers = ["model", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum", "ROUGE-L vs original"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def interval_table(variants: list[str], evaluation: dict[str, dict], labels: dict[str, str] | None = None) -> str:
    """Per variant: the mean over seeds with its 95% interval per ROUGE type, the seeds and each seed's
    ROUGE-L with their standard deviation (training noise; none with one seed, or for a baseline)."""
    rows = []
    for v in variants:
        e = evaluation[v]
        sd = e.get("rougeL_seed_sd")
        seeds = ", ".join(f"{x:.2f}" for x in e.get("seed_rougeL", [])) if e.get("seeds", 1) > 1 else "-"
        rows.append(
            [
                label(v, labels),
                *(f"{e[t]:.2f} [{e[f'{t}_ci_low']:.2f}, {e[f'{t}_ci_high']:.2f}]" for t in ROUGE_TYPES),
                e.get("seeds", 1),
                seeds,
                f"{sd:.2f}" if sd is not None else "-",
            ]
        )
    headers = ["model", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum", "seeds", "ROUGE-L per seed", "seed SD"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def cost_table(
    variants: list[str],
    evaluation: dict[str, dict],
    cost: dict[str, dict],
    frontier: list[dict],
    labels: dict[str, str] | None = None,
) -> str:
    """Quality and cost side by side, one row per variant."""
    pareto = {row["variant"]: pareto_cell(row, labels) for row in frontier}
    rows = []
    for v in variants:
        c, memory = cost[v], next((k for k in cost[v] if k.startswith("peak_")), None)
        rows.append(
            [
                label(v, labels),
                f"{evaluation[v]['rougeL']:.2f} [{evaluation[v]['rougeL_ci_low']:.2f}, {evaluation[v]['rougeL_ci_high']:.2f}]",
                f"{c['trainable_params']:,} ({c['trainable_percent']:.2f}%)",
                f"{c['saved_mb']:.1f}",
                f"{c['train_runtime_s'] / 60:.1f} min",
                f"{c[memory]:,.0f} ({'GPU' if memory == 'peak_gpu_memory_mb' else 'RSS'})" if memory else "-",
                f"{c['generation_dialogues_per_second']:.2f}",
                pareto.get(v, "-"),
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


def diagnostics_table(
    variants: list[str], generation: dict[str, dict], evaluation: dict[str, dict], labels: dict[str, str] | None = None
) -> str:
    rows = [
        [
            label(v, labels),
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


def runs_table(
    variants: list[str], generation: dict[str, dict], cost: dict[str, dict], labels: dict[str, str] | None = None
) -> str:
    """What `precision: auto` and the out-of-memory retries resolved to, per variant: a bf16 run and
    an fp32 run give different numbers, so a reader must see which ran. "base weights held in" is
    the dtype of the weights a method did not train (a PEFT method's frozen base: bf16 under bf16
    training, 4bit for QLoRA) or, for full fine-tuning, of the trained weights: part of what a
    method's peak memory reflects."""
    rows = []
    for v in variants:
        c, g = cost[v], generation[v]
        trained = "train_precision" in c
        rows.append(
            [
                label(v, labels),
                f"{c['train_precision']}{' + TF32' if c.get('train_tf32') else ''}" if trained else "-",
                c.get("train_base_dtype", "-") if trained else "-",
                c.get("train_device", "-") if trained else "-",
                c.get("train_oom_retries", "-") if trained else "-",
                apart_time(c) if trained else "-",
                g.get("generation_precision", "-"),
                c.get("generation_device", "-"),
                c.get("generation_batch_size", "-") or "-",
            ]
        )
    headers = [
        "model",
        "train precision",
        "base weights held in",
        "train device",
        "out-of-memory restarts",
        "validation + final save",
        "generation precision",
        "generation device",
        "generation batch",
    ]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def apart_time(c: dict) -> str:
    """The time a trained method spent beside its training loop: validating and its final save."""
    if "validation_runtime_s" not in c:
        return "-"
    return f"{c['validation_runtime_s'] / 60:.1f} + {c.get('save_runtime_s', 0.0) / 60:.1f} min"


def examples_section(
    variants: list[str],
    predictions: dict[str, list[dict]],
    references: dict[str, list[str]],
    count: int,
    labels: dict[str, str] | None = None,
) -> str:
    first = predictions[variants[0]]
    blocks = []
    for index in range(min(count, len(first))):
        row = first[index]
        lines = [f"### {row['id']}", "", "```", row["dialogue"], "```", "", f"- **human**: {references[row['id']][0]}"]
        lines += [f"- **{label(v, labels)}**: {predictions[v][index]['prediction']}" for v in variants]
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


def plot_rows(
    variants: list[str], evaluation: dict[str, dict], cost: dict[str, dict], labels: dict[str, str] | None = None
) -> list[dict]:
    """ROUGE per variant for the bar chart: display name, report order, and the panel it goes in
    (the variants that train nothing apart from the trained ones)."""
    return [
        {
            "variant": v,
            "label": label(v, labels),
            "order": order,
            "group": BASELINES_GROUP if cost[v]["trainable_params"] == 0 else TRAINED_GROUP,
            **{t: evaluation[v][t] for t in ROUGE_TYPES},
            "rougeL_ci_low": evaluation[v]["rougeL_ci_low"],
            "rougeL_ci_high": evaluation[v]["rougeL_ci_high"],
        }
        for order, v in enumerate(variants)
    ]


def image(name: str, alt: str) -> str:
    """A markdown image of metrics/plots/<name>.png, relative to the report."""
    return f"![{alt}]({(PLOTS_DIR / f'{name}.png').relative_to(REPORT_FILE.parent).as_posix()})"


def quantization_notes(
    variants: list[str], generation: dict[str, dict], labels: dict[str, str] | None = None
) -> list[str]:
    """One note per variant whose base was quantized (QLoRA): its base differs from the others'."""
    return [
        f"Note: **{label(v, labels)}** was trained and evaluated on a {q}-quantized base (QLoRA), not the base the other "
        "variants use; its training memory in the cost table is what quantization saves."
        for v in variants
        if (q := generation[v].get("base_quantization", "none")) != "none"
    ]


def render(
    variants: list[str],
    evaluation: dict[str, dict],
    generation: dict[str, dict],
    cost: dict[str, dict],
    tests: list[dict],
    frontier: list[dict],
    base_model: dict,
    examples: str,
    data_source: str,
    tuning: dict,
    labels: dict[str, str] | None = None,
    mismatches: dict[str, list] | None = None,
    verdict: Verdict | None = None,
) -> str:
    mismatches = mismatches or {}
    return (
        "\n\n".join(
            [
                f"# {base_model['base_model_name']} on {data_source}: "
                + " vs ".join(label(v, labels) for v in variants),
                f"Base model `{base_model['base_model_name']}` at revision `{base_model['base_model_revision']}` "
                f"(resolved: `{base_model['base_model_resolved_revision']}`). ROUGE F-measures x100 on the test split, "
                "one generated summary per unique dialogue.",
                *(verdict.section() if verdict else []),
                *quantization_notes(variants, generation, labels),
                "## Quality and cost",
                "Trainable params, adapter or model size on disk, whole-run train wall time (across resumes), peak "
                "memory while training (GPU: torch.cuda.max_memory_allocated; CPU: the process's peak RSS) and generation "
                "throughput. Train time and memory are measured, so they vary from run to run. Pareto-optimal: no other "
                "variant has as few trainable params and as high a ROUGE-L (point estimates). The variants that train "
                "nothing (the original model, lead) count at 0 params, so a trained variant at or below the best of them "
                'is dominated. "But its 95% CI overlaps" names the cheapest variant whose interval reaches this one\'s: '
                "its gain over that one is within the noise (interval overlap, not a test; the paired tests below are).",
                cost_table(variants, evaluation, cost, frontier, labels),
                "The frontier below draws the trained variants on a log axis of trainable params; the zero-cost "
                "variants have no place on it, so they are dashed horizontal reference lines, their 95% CI shaded.",
                image(FRONTIER_PLOT, "ROUGE-L against trainable parameters, zero-cost variants as reference lines"),
                "## Multi-reference ROUGE (best reference per ROUGE type)",
                rouge_table(variants, evaluation, "", labels),
                image(ROUGE_PLOT, "ROUGE-L by variant with 95% bootstrap intervals"),
                "## Mean over references (comparable to per-row numbers reported elsewhere)",
                rouge_table(variants, evaluation, "_mean_ref", labels),
                "## 95% confidence intervals (multi-reference)",
                INTERVALS,
                interval_table(variants, evaluation, labels),
                f"## Paired tests on ROUGE-L (Holm-adjusted over {len(tests)} comparisons, family-wise error rate "
                f"{SIGNIFICANCE})",
                "Paired tests on per-dialogue multi-reference ROUGE-L: the same test dialogues on both sides. With one "
                "seed a side, a sign-flip randomization test with a paired bootstrap CI; with more, each side's seeds are "
                "resampled on their own and the dialogues together (two-level bootstrap), and the test is the difference "
                "over its bootstrap standard error on Welch-Satterthwaite degrees of freedom. "
                f"The p-values are Holm-adjusted over "
                f"the {len(tests)} comparisons, so the chance of wrongly calling any of them significant is at "
                f'most {SIGNIFICANCE} (family-wise error rate); "significantly" means Holm-adjusted p < {SIGNIFICANCE}. '
                f"Each line shows the raw p too; the 95% CIs (paired bootstrap of the mean difference) are not adjusted.",
                "\n".join(comparison_sentence(t, labels) for t in tests) or "(fewer than two comparable variants)",
                "## Generation diagnostics",
                diagnostics_table(variants, generation, evaluation, labels),
                "## How each variant ran",
                "Train time in the cost table is the training loop without its validations (its checkpoint saves "
                "stay in it); validating (loss and generation) and the final "
                "save (a whole model for full fine-tuning, an adapter otherwise) are shown here apart. "
                "The precision `auto` resolved to (bf16 where the hardware runs it natively, else fp32), the "
                "dtype of the weights a method did not train (a PEFT method's frozen base: bf16 under bf16 "
                "training, 4bit for QLoRA; for full fine-tuning, its trained weights), which is part of what its "
                "peak memory reflects, the devices, how often training restarted at half the batch after running "
                "out of memory (the same samples per step), and the generation batch after any out-of-memory halving.",
                runs_table(variants, generation, cost, labels),
                "## How each method was chosen on validation",
                selection_table(variants, cost, tuning, labels, mismatches),
                tuning_sentence(tuning),
                "## Examples",
                examples,
            ]
        )
        + "\n"
    )


def run_curves(loaded: dict[str, Variant], labels: dict[str, str]) -> tuple[dict[str, dict], dict[str, str]]:
    """Every run's curves for the curated plots, each seed its own line when there are several."""
    curves, names = {}, {}
    for variant in loaded.values():
        for run, seed, record in zip(variant.runs, variant.seeds, variant.curves):
            curves[run] = record
            names[run] = labels[variant.name] + (f" seed {seed}" if len(variant.runs) > 1 else "")
    return curves, names


def load_variant(name: str, seeds: list[int] | None) -> Variant:
    """A variant's runs (each seed of a trained method, or the baseline's one run) and their files."""
    runs = [run_name(name, seed) for seed in seeds] if seeds else [run_name(name)]
    return Variant(
        name,
        runs,
        list(seeds) if seeds else [None],
        [read_json(EVALUATE_DIR / f"{r}.json") for r in runs],
        [read_json(GENERATE_DIR / f"{r}.json") for r in runs],
        [read_json(COST_DIR / f"{r}.json") for r in runs],
        [read_jsonl(SCORES_DIR / f"{r}.jsonl") for r in runs],
        [read_json(CURVES_DIR / f"{r}.json") for r in runs],  # curves and the params each training ran with
    )


def main() -> None:
    params = load_params()
    order = [*params.baselines, *params.variants]  # report order: the baselines, then the trained methods
    loaded = {v: load_variant(v, params.seeds if v in params.variants else None) for v in order}
    resamples, seed = params.evaluate.bootstrap_resamples, params.seed
    evaluation = {v: evaluation_row(loaded[v], resamples, seed) for v in order}
    generation = {v: mean_row(loaded[v].generation) for v in order}
    cost = {v: mean_row(loaded[v].cost) for v in order}
    labels = variant_labels(order, cost)
    tuning = read_json(TUNING_FILE)
    mismatches = tuning_mismatches(tuning, {v: [c.get("params", {}) for c in loaded[v].curves] for v in order})
    runs = [r for v in order for r in loaded[v].runs]
    predictions = {r: read_jsonl(PREDICTIONS_DIR / f"{r}.jsonl") for r in runs}
    references = {row["id"]: row["references"] for row in read_jsonl(REFERENCES_FILE)}
    full = full_fine_tuning(order, cost)
    tests = comparisons(loaded, comparison_pairs(order, full), resamples, seed)
    frontier = frontier_rows(order, evaluation, cost, labels)
    firsts = {v: predictions[loaded[v].runs[0]] for v in order}  # the examples show each variant's first seed
    examples = examples_section(order, firsts, references, params.report.examples, labels)
    verdict = Verdict(params.variants, params.seeds, tests, cost, labels, full, tuning, mismatches)
    REPORT_FILE.write_text(
        render(
            order,
            evaluation,
            generation,
            cost,
            tests,
            frontier,
            read_json(BASE_MODEL_FILE),
            examples,
            params.data.source,
            tuning,
            labels,
            mismatches,
            verdict,
        )
    )
    rouge_rows = plot_rows(order, evaluation, cost, labels)
    write_json(rouge_rows, PLOT_FILE)
    write_json(frontier, FRONTIER_FILE)
    write_curve_rows(curve_rows(*run_curves(loaded, labels)))
    for name, rows in ((ROUGE_PLOT, rouge_rows), (FRONTIER_PLOT, frontier)):
        render_png(fill(load_template(name), rows, REVISION), PLOTS_DIR / f"{name}.png")
    scores = {r: rows for v in order for r, rows in zip(loaded[v].runs, loaded[v].scores)}
    PER_DIALOGUE_FILE.parent.mkdir(parents=True, exist_ok=True)
    PER_DIALOGUE_FILE.write_text(
        "".join(
            json.dumps(r, ensure_ascii=False) + "\n" for r in per_dialogue_rows(runs, predictions, scores, references)
        )
    )


if __name__ == "__main__":
    run_stage(main)
