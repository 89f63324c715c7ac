"""The curated plots, as a reader sees them: real `dvc plots show` / `dvc plots diff` in a temp git repo
(a copy of this one), the real report stage, and every plot rendered offline with vl-convert.

The pipeline's outputs are written directly (metrics, per-dialogue scores, each variant's curves file
as evaluate@ carries it, DVCLive's live curves in DVCLive's own TSV layout) instead of training, so
this runs in seconds and needs no model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import vl_convert
import yaml

from stages.plots import VEGA_LITE_VERSION
from tests.conftest import REPO
from tests.test_pipeline import git_commit, run, run_json

TRAINING_LOSS, LEARNING_RATE, VALIDATION_ROUGE = (
    "metrics/plots/training_loss.json",
    "metrics/plots/learning_rate.json",
    "metrics/plots/validation_rougeL.json",
)
CURATED = {TRAINING_LOSS, LEARNING_RATE, VALIDATION_ROUGE, "rouge_by_variant", "frontier"}
METHODS = ("full", "lora", "ia3", "prompt")
# each method's type as its training stage records it (metrics/train/<m>.json method_type, carried to
# the cost row), and what the report, and so every plot, calls it
METHOD_TYPES = {"full": "full", "lora": "lora", "ia3": "ia3", "prompt": "prompt_tuning"}
LABELS = {"full": "full fine-tuning", "lora": "LoRA", "ia3": "IA3", "prompt": "prompt tuning"}
# Multi-reference ROUGE-L (x100) and trainable params per variant, close to a real flan-t5-base run:
# LoRA's interval reaches full fine-tuning's, prompt tuning scores exactly 0.0 (a collapsed run).
ROUGE_L = {"base": 24.1, "full": 36.2, "lora": 35.6, "ia3": 31.0, "prompt": 0.0, "lead": 16.5}
TRAINABLE = {"base": 0, "full": 247_577_856, "lora": 1_769_472, "ia3": 110_592, "prompt": 15_360, "lead": 0}
HALF_WIDTH = 1.1  # each variant's 95% interval: ROUGE-L +- this
DIALOGUES = 20
STEPS = 12  # optimizer steps per method; train loss every 2, validation loss every 4
START_LOSS = {"full": 2.1, "lora": 2.4, "ia3": 2.8, "prompt": 3.3}


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


BASELINES = ("base", "lead")


def run_path(variant: str) -> str:
    """Where a variant's one run writes: a trained method under seed 42, a baseline under its name."""
    return variant if variant in BASELINES else f"{variant}/seed42"


def write_variant(repo: Path, variant: str, rouge_l: float, trainable: int) -> None:
    """What generate@ and evaluate@ write for one variant: its metrics, cost row, predictions, scores."""
    rng = np.random.default_rng(len(variant))
    low, high = max(rouge_l - HALF_WIDTH, 0.0), rouge_l + HALF_WIDTH if rouge_l else 0.0
    evaluation = {"dialogues": DIALOGUES, "references": 3 * DIALOGUES}
    for rouge_type in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        evaluation |= {
            rouge_type: rouge_l,
            f"{rouge_type}_mean_ref": rouge_l * 0.9,
            f"{rouge_type}_ci_low": low,
            f"{rouge_type}_ci_high": high,
        }
    write_json(repo / "metrics" / "evaluate" / f"{run_path(variant)}.json", evaluation)
    write_json(
        repo / "metrics" / "generate" / f"{run_path(variant)}.json", {"gen_mean_tokens": 21.5, "gen_hit_max_share": 0.0}
    )
    write_json(
        repo / "metrics" / "cost" / f"{run_path(variant)}.json",
        {
            **({"method_type": METHOD_TYPES[variant]} if variant in METHOD_TYPES else {}),
            "trainable_params": trainable,
            "trainable_percent": 100 * trainable / TRAINABLE["full"],
            "total_params": TRAINABLE["full"],
            "saved_mb": trainable * 4 / 2**20,
            "train_runtime_s": 600.0 if trainable else 0.0,
            "peak_gpu_memory_mb": 9000.0,
            "generation_dialogues_per_second": 12.0,
            "generation_precision": "bf16",  # a key the report does not read: tolerated
        },
    )
    ids = [f"test_{i}" for i in range(DIALOGUES)]
    references = [[f"Person1 books table {i}.", f"A table {i} is booked.", "Dinner."] for i in range(DIALOGUES)]
    write_jsonl(
        repo / "data" / "predictions" / f"{run_path(variant)}.jsonl",
        [
            {"id": i, "dialogue": f"#Person1#: table {n}?", "references": r, "prediction": f"{variant} summary {n}"}
            for n, (i, r) in enumerate(zip(ids, references))
        ],
    )
    write_jsonl(
        repo / "data" / "prepared" / "references.jsonl", [{"id": i, "references": r} for i, r in zip(ids, references)]
    )
    per_dialogue = np.clip(rouge_l / 100 + rng.normal(0, 0.05, DIALOGUES), 0, 1) if rouge_l else np.zeros(DIALOGUES)
    write_jsonl(
        repo / "data" / "scores" / f"{run_path(variant)}.jsonl",
        [
            {"id": i, **{t: float(s) for t in ("rouge1", "rouge2", "rougeL", "rougeLsum")}}
            for i, s in zip(ids, per_dialogue)
        ],
    )


def train_loss(start_loss: float, step: int) -> float:
    return round(start_loss * 0.93**step, 6)


def validation_loss(start_loss: float, step: int) -> float:
    return round(start_loss * 0.95**step + 0.1, 6)


def write_curves(repo: Path, method: str, start_loss: float, learning_rate: float) -> None:
    """One method's curves: metrics/curves/<method>.json as evaluate@ carries it from the training
    stage's metrics/validation/<method>.json (train loss and learning rate every 2 steps, a linear LR
    decay to 0; validation ROUGE-L x100 and loss every 4), and the same curves as DVCLive's TSVs
    (dvclive/<method>/plots, a stage out that `dvc plots show` must not draw)."""
    training = [
        {"step": s, "loss": train_loss(start_loss, s), "learning_rate": learning_rate * (1 - s / STEPS)}
        for s in range(2, STEPS + 1, 2)
    ]
    validation = [
        {"step": s, "rougeL": 20 + s / 2, "loss": validation_loss(start_loss, s)} for s in range(4, STEPS + 1, 4)
    ]
    write_json(
        repo / "metrics" / "curves" / f"{run_path(method)}.json", {"validation": validation, "training": training}
    )

    metrics = repo / "dvclive" / method / "plots" / "metrics"
    (metrics / "eval").mkdir(parents=True, exist_ok=True)

    def tsv(name: str, rows: list[dict]) -> str:
        return f"step\t{name}\n" + "".join(f"{r['step']}\t{r[name]:.6g}\n" for r in rows)

    (metrics / "loss.tsv").write_text(tsv("loss", training))
    (metrics / "learning_rate.tsv").write_text(tsv("learning_rate", training))
    (metrics / "eval" / "loss.tsv").write_text(tsv("loss", validation))
    (metrics / "eval" / "rougeL.tsv").write_text(tsv("rougeL", validation))


def write_outputs(repo: Path, rouge_l: dict[str, float]) -> None:
    """Every input the report and the plots read, for the variants in `rouge_l`."""
    write_json(
        repo / "metrics" / "base_model.json",
        {
            "base_model_name": "google/flan-t5-base",
            "base_model_revision": "main",
            "base_model_resolved_revision": "abc",
        },
    )
    for variant, score in rouge_l.items():
        write_variant(repo, variant, score, TRAINABLE[variant])
    for method, loss, lr in zip(METHODS, START_LOSS.values(), (1.0e-4, 1.0e-3, 8.0e-3, 3.0e-1)):
        write_curves(repo, method, loss, lr)
    for baseline in ("base", "lead"):  # evaluate@ carries their empty record: nothing trained
        write_json(repo / "metrics" / "curves" / f"{baseline}.json", {"validation": [], "training": []})


def set_variants(repo: Path, variants: list[str]) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["variants"] = [v for v in variants if v not in BASELINES]  # trained, each under seed 42
    params["baselines"] = [v for v in variants if v in BASELINES]
    params["seeds"] = [42]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_report(repo: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    result = subprocess.run(
        [sys.executable, "-m", "stages.report"], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"report stage failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory) -> Path:
    """A git+DVC copy of this repo with the pipeline's outputs written and the report stage run."""
    repo = tmp_path_factory.mktemp("plots") / "repo"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    run(["git", "init", "-q"], repo)
    write_outputs(repo, ROUGE_L)
    set_variants(repo, list(ROUGE_L))
    run_report(repo)
    return repo


@pytest.fixture(scope="module")
def shown(plots_repo) -> dict:
    return run_json(["dvc", "plots", "show", "--json"], plots_repo)


def specs(shown: dict) -> dict[str, dict]:
    """Each plot's filled Vega-Lite spec, as `dvc plots show` would draw it."""
    assert not shown.get("errors"), shown["errors"]
    return {name: entries[0]["content"] for name, entries in shown["data"].items()}


def texts(spec: dict) -> dict[str, list[str]]:
    """What a reader can read on the rendered plot, by role: title-text, title-subtitle, axis-title,
    axis-label (x: bottom axis, y: left axis), legend-label, legend-title, mark (text marks) and
    facet headers (header-label). Rendered offline by vl-convert."""
    found: dict[str, list[str]] = {}

    def walk(node: dict, orient: str | None, in_cell: bool) -> None:
        orient = node.get("orient", orient) if isinstance(node.get("orient"), str) else orient
        # a facet's panel or header: its title is the facet header (a label per panel)
        in_cell = in_cell or node.get("role") == "scope" or str(node.get("role")).endswith("-header")
        if node.get("marktype") == "text":
            role = node.get("role", "")
            role = "header-label" if in_cell and role == "title-text" else role
            if role == "axis-label":
                role = f"axis-label-{'x' if orient in ('bottom', 'top') else 'y'}"
            for item in node.get("items", []):
                text = item.get("text")
                found.setdefault(role, []).append(" ".join(text) if isinstance(text, list) else str(text))
        for item in node.get("items", []):
            if isinstance(item, dict):
                walk(item, orient, in_cell)

    walk(vl_convert.vegalite_to_scenegraph(spec, vl_version=VEGA_LITE_VERSION)["scenegraph"], None, False)
    return found


# --- which plots ---------------------------------------------------------------


def test_dvc_plots_show_lists_exactly_the_curated_plots(plots_repo, shown):
    assert (plots_repo / "dvclive" / "lora" / "plots" / "metrics" / "eval" / "loss.tsv").is_file()
    assert set(shown["data"]) == CURATED  # not one plot per DVCLive TSV
    assert not shown.get("errors"), shown["errors"]


def test_every_plot_renders_offline_with_a_title(shown, tmp_path):
    for name, spec in specs(shown).items():
        png = vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE_VERSION)
        assert png.startswith(b"\x89PNG"), name
        assert texts(spec)["title-text"] and all(texts(spec)["title-text"]), name


# --- training curves -------------------------------------------------------------


def test_training_curves_have_a_legend_per_method_and_curve_and_integer_steps(shown):
    spec = specs(shown)[TRAINING_LOSS]
    seen = texts(spec)
    assert seen["title-text"] == ["Train and validation loss per optimizer step"]
    # each method by its report label (from its recorded type), in `variants` order
    assert seen["legend-label"] == [f"{LABELS[m]} · {curve}" for m in METHODS for curve in ("train", "validation")]
    assert all(label.isdigit() for label in seen["axis-label-x"])  # steps 0, 2, 4 ... never 2.5
    assert {"optimizer step", "loss (cross-entropy per target token, nats)"} <= set(seen["axis-title"])
    # validation loss is drawn at the step it was taken (4, 8, 12), not at its row number
    values = [v for v in spec["data"]["values"] if v["curve"] == "validation" and v["method"] == "LoRA"]
    assert [int(v["step"]) for v in values] == [4, 8, 12]
    assert [float(v["loss"]) for v in values] == [validation_loss(START_LOSS["lora"], s) for s in (4, 8, 12)]
    assert {int(v["place"]) for v in values} == {METHODS.index("lora")}  # its place among the reported methods


def test_one_colour_per_method_and_one_dash_per_curve(shown):
    """The 8 drawn lines: 4 colours (one per method), each once solid (train) and once dashed (validation).
    Colours and dashes differ per series by a shift too small to see (see the template), so compare them
    as a reader would: hue to the degree, a dash as solid or not."""
    scene = vl_convert.vegalite_to_scenegraph(specs(shown)[TRAINING_LOSS], vl_version=VEGA_LITE_VERSION)
    lines = []

    def walk(node):
        if node.get("marktype") == "line":
            item = node["items"][0]
            hue, saturation, lightness = re.fullmatch(r"hsl\(([\d.]+),(\d+)%,(\d+)%\)", item["stroke"]).groups()
            dash = item.get("strokeDash") or [1, 0]
            lines.append(((round(float(hue)), saturation, lightness), "solid" if dash[1] == 0 else "dashed"))
        for child in node.get("items", []):
            if isinstance(child, dict):
                walk(child)

    walk(scene["scenegraph"])
    assert len(set(lines)) == len(lines) == 2 * len(METHODS)
    colours = {colour for colour, _ in lines}
    assert len(colours) == len(METHODS)
    assert sorted(lines) == sorted((colour, dash) for colour in colours for dash in ("solid", "dashed"))


def test_validation_rouge_curve_is_drawn_like_the_loss_curves(shown):
    """The validation ROUGE-L curve (each method's validation history, metrics/validation/<m>.json)
    uses the same template: one colour per method, named in the legend, on integer optimizer steps."""
    spec = specs(shown)[VALIDATION_ROUGE]
    seen = texts(spec)
    assert seen["title-text"] == ["Validation ROUGE-L per optimizer step (the checkpoint select_by keeps)"]
    assert seen["legend-label"] == [f"{LABELS[m]} · validation" for m in METHODS]
    assert all(label.isdigit() for label in seen["axis-label-x"])


def test_learning_rate_on_a_log_axis_with_a_title(shown):
    spec = specs(shown)[LEARNING_RATE]
    seen = texts(spec)
    assert seen["title-text"] == ["Learning-rate schedule per optimizer step"]
    assert seen["legend-label"] == [LABELS[m] for m in METHODS]
    # full (1e-4) and prompt (0.3) on one readable axis of powers of ten, reaching down to the 0 the
    # linear decay ends at (symlog: linear below 1e-6)
    assert {"0", "1e-4", "1e-3", "1e-2", "1e-1"} <= set(seen["axis-label-y"])
    assert "learning rate (log scale, linear below 1e-6 to reach 0)" in seen["axis-title"]
    assert all(label.isdigit() for label in seen["axis-label-x"])


# --- ROUGE by variant -------------------------------------------------------------


def test_rouge_by_variant_in_report_order_with_display_names_and_intervals(shown):
    spec = specs(shown)["rouge_by_variant"]
    seen = texts(spec)
    assert seen["title-text"] == ["Multi-reference ROUGE-L by variant"]
    # two panels: the variants that train nothing apart, each in `variants` order
    assert seen["header-label"] == ["baselines (no training)", "trained"]
    assert seen["axis-label-y"] == [
        "original (zero-shot)",
        "lead baseline",
        "full fine-tuning",
        "LoRA",
        "IA3",
        "prompt tuning",
    ]
    assert "ROUGE-L F-measure x100 (multi-reference, 0-100 points)" in seen["axis-title"]
    assert sorted(seen["mark"]) == sorted(f"{ROUGE_L[v]:.2f}" for v in ROUGE_L)  # a value label on every bar
    rows = {r["variant"]: r for r in spec["data"]["values"]}
    assert rows["lora"]["rougeL_ci_low"] == pytest.approx(ROUGE_L["lora"] - HALF_WIDTH)


def test_a_variant_at_zero_is_drawn_and_a_missing_one_is_labelled_missing(plots_repo, tmp_path):
    """`dvc plots diff` of a revision without prompt tuning against one where it scores 0.0."""
    repo = plots_repo
    git_commit(repo, "all variants; prompt tuning at 0.0")
    set_variants(repo, ["base", "full", "lora", "ia3", "lead"])
    try:
        run_report(repo)
        diff = run_json(["dvc", "plots", "diff", "HEAD", "--json", "--targets", "rouge_by_variant"], repo)
        # the curves follow `variants` too: prompt tuning's are gone, the others keep their places
        curves = json.loads((repo / TRAINING_LOSS).read_text())
    finally:
        run(["git", "checkout", "--", "."], repo)
    assert sorted({(r["place"], r["method"]) for r in curves}) == [(0, "full fine-tuning"), (1, "LoRA"), (2, "IA3")]
    labels = texts(specs(diff)["rouge_by_variant"])["mark"]
    assert "0.00 (HEAD)" in labels  # drawn at 0 with its value
    assert "missing (workspace)" in labels  # absent in the working tree, and said so
    assert "24.10 (HEAD)" in labels and "24.10 (workspace)" in labels


# --- the frontier -------------------------------------------------------------------


def test_frontier_draws_the_zero_cost_variants_as_reference_lines(shown):
    spec = specs(shown)["frontier"]
    seen = texts(spec)
    assert seen["title-text"] == ["Quality against cost"]
    assert "Dashed lines, labelled on the right: the zero-cost variants" in " ".join(seen["title-subtitle"])
    marks = seen["mark"]
    assert {"original (zero-shot) 24.10", "lead baseline 16.50"} <= set(marks)  # the reference lines' labels
    assert {"full fine-tuning 36.20", "LoRA 35.60", "IA3 31.00", "prompt tuning 0.00"} <= set(marks)
    # tidy log ticks: powers of ten only, in SI units
    assert seen["axis-label-x"] == ["10k", "100k", "1M", "10M", "100M", "1G"]


def test_frontier_does_not_present_an_overlapping_gain_as_better(shown):
    spec = specs(shown)["frontier"]
    status = {r["variant"]: r["status"] for r in spec["data"]["values"]}
    # full beats LoRA on the point estimate only: LoRA's interval reaches full's
    assert status["full"] == "Pareto-optimal, but its 95% CI overlaps a cheaper variant's"
    assert status["lora"] == "Pareto-optimal"
    assert status["prompt"] == "dominated"  # 0.0, below the original model at 0 params
    legend = texts(spec)["legend-label"]
    assert "Pareto-optimal, but its 95% CI overlaps a cheaper variant's" in legend


# --- the report ------------------------------------------------------------------------


def test_report_embeds_the_rendered_frontier_and_rouge_plots(plots_repo):
    report = (plots_repo / "metrics" / "report.md").read_text()
    for name in ("frontier", "rouge_by_variant"):
        assert f"](plots/{name}.png)" in report
        assert (plots_repo / "metrics" / "plots" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert "dashed horizontal reference lines" in report
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in dvc_yaml["stages"]["report"]["outs"]]
    assert {"metrics/plots/frontier.png", "metrics/plots/rouge_by_variant.png"} <= set(outs)


def test_the_report_writes_the_training_curve_plots_data_from_each_variants_curves(plots_repo):
    """The three curve plots' rows are the report's outs, from metrics/curves/<variant>.json (evaluate@'s
    copy of the training stage's record): every trained variant's curves, labelled and placed in
    `variants` order; the baselines (empty curves) have none."""
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    report = dvc_yaml["stages"]["report"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in report["outs"]]
    assert {TRAINING_LOSS, LEARNING_RATE, VALIDATION_ROUGE} <= set(outs)
    assert "metrics/curves" in report["deps"]
    rows = {
        name: json.loads((plots_repo / name).read_text()) for name in (TRAINING_LOSS, LEARNING_RATE, VALIDATION_ROUGE)
    }
    for place, method in enumerate(METHODS):
        mine = {name: [r for r in found if r["method"] == LABELS[method]] for name, found in rows.items()}
        assert {r["place"] for found in mine.values() for r in found} == {place}
        assert [(r["curve"], r["step"], r["loss"]) for r in mine[TRAINING_LOSS]] == [
            *(("train", s, train_loss(START_LOSS[method], s)) for s in range(2, STEPS + 1, 2)),
            *(("validation", s, validation_loss(START_LOSS[method], s)) for s in range(4, STEPS + 1, 4)),
        ]
        assert [(r["curve"], r["step"]) for r in mine[LEARNING_RATE]] == [("train", s) for s in range(2, STEPS + 1, 2)]
        assert [(r["curve"], r["step"], r["rougeL"]) for r in mine[VALIDATION_ROUGE]] == [
            ("validation", s, 20 + s / 2) for s in range(4, STEPS + 1, 4)
        ]
    assert {r["method"] for found in rows.values() for r in found} == set(LABELS.values())  # no baseline rows
