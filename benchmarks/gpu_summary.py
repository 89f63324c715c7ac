"""benchmarks/gpu.sh's summary: every part's JSON so far into $OUT/results.json, and $OUT/summary.md with
the GPU targets as measured (met, missed and by how much, or not measured when a part did not get there).

    python benchmarks/gpu_summary.py PARTS_DIR STEPS_TSV CARD_TXT OUT_DIR

Run after every part, so a part cut by its budget or a later failure leaves the earlier results in $OUT.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def target_rows(parts: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each GPU target."""
    stages, train, memory = parts.get("stages", {}), parts.get("train", {}), parts.get("memory", {})
    overhead = parts.get("overhead", {})
    rows = []

    total = (stages.get("projection_default_repro") or {}).get("total_min")
    rows.append(("default pipeline <= 30 min (projected from per-stage measurements)", total, 30.0, "min", "<="))
    ratio = overhead.get("trainer_over_plain_loop")
    rows.append(("Trainer path >= 0.9x a plain loop's samples/s", ratio, 0.9, "x", ">="))
    mfus = [v.get("mfu") for v in train.values() if isinstance(v, dict) and v.get("mfu") is not None]
    rows.append(("full fine-tuning >= 30% MFU (best of compile off/on)", max(mfus) if mfus else None, 0.30, "", ">="))
    rows.append(("every PEFT method's peak <= 0.5x full's (worst method, best setting)", worst_best(memory), 0.5, "x",
                 "<="))  # fmt: skip
    rows.append(("generation >= 30x the seed recipe", stages.get("generation_over_seed"), 30.0, "x", ">="))
    out = []
    for name, value, threshold, unit, sense in rows:
        if value is None:
            out.append((name, "not measured", "not measured"))
            continue
        met = value <= threshold if sense == "<=" else value >= threshold
        shown = f"{100 * value:.1f}%" if unit == "" else f"{value:g}{' ' + unit if unit == 'min' else unit}"
        out.append((name, shown, "met" if met else f"NO ({value / threshold:.2f} of the target)"))
    return out


def worst_best(memory: dict) -> float | None:
    """The largest, over PEFT methods, of each method's best peak/full ratio (checkpointing off or on)."""
    best: dict[str, float] = {}
    for key, value in memory.items():
        if not isinstance(value, dict) or key.startswith("full") or value.get("peak_over_full_gc0") is None:
            continue
        method = key.rsplit("_gc", 1)[0]
        best[method] = min(best.get(method, float("inf")), value["peak_over_full_gc0"])
    return max(best.values()) if best else None


def main(parts_dir: str, steps_tsv: str, card_txt: str, out_dir: str) -> None:
    parts = {p.stem: load(p) for p in sorted(Path(parts_dir).glob("*.json"))}
    steps = (
        [line.split("\t") for line in Path(steps_tsv).read_text().splitlines() if line]
        if Path(steps_tsv).is_file()
        else []
    )
    card = Path(card_txt).read_text().strip() if Path(card_txt).is_file() else "unknown card"
    out = Path(out_dir)
    (out / "results.json").write_text(json.dumps({"card": card, "steps": steps, "parts": parts}, indent=2) + "\n")
    md = [f"# GPU run: {card}", "", "| part | exit | seconds |", "|---|---|---|"]
    md += [f"| {s[0]} | {s[1]} | {s[2] if len(s) > 2 else ''} |" for s in steps]
    md += ["", "## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    md += [f"| {name} | {value} | {verdict} |" for name, value, verdict in target_rows(parts)]
    for name, data in parts.items():
        md += ["", f"## {name}", "", "```json", json.dumps(data, indent=1)[:6000], "```"]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main(*sys.argv[1:5])
