"""The method axis, declared once: params.yaml `methods` and one section per method (its type, what its
recipe changes of the shared `train` section, its arguments), and what derives from it."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.params import load_params, parse_params
from tests.conftest import REPO, problems, run_bare_stage

# params.yaml as it was before the shared `train` section existed (one full train_<method> section per
# method), kept as data: the default run must stay that run.
BEFORE = yaml.safe_load((REPO / "tests" / "fixtures" / "params_before_shared_recipe.yaml").read_text())


def test_every_default_method_resolves_to_its_recipe_and_arguments_before_the_shared_section():
    params = load_params(REPO / "params.yaml")
    assert params.methods == ["full", "lora", "ia3", "prompt"]
    # recipe keys since, at what the recipe did before them: the fused AdamW it hard-coded, no sharding, one node
    since = {"optimizer": "adamw_torch_fused", "sharding": "none", "nodes": 1}
    for method in params.methods:
        assert dataclasses.asdict(params.recipe(method)) == {**BEFORE[f"train_{method}"], **since}, method
    for method in ("lora", "ia3", "prompt"):
        assert dataclasses.asdict(params.method(method).config) == BEFORE[method], method
    # the variants compared are the same: the trained ones in `variants`, base and lead in `baselines`
    assert ["base", *params.variants, "lead"] == BEFORE["variants"] and params.baselines == ["base", "lead"]
    assert params.seeds == [BEFORE["seed"]]  # one training seed, the one the single-seed pipeline trained with
    skip = ("methods", "train", "sections", "variants", "baselines", "seeds", "tune")
    # one change since: validation scores all 500 dialogues, as tuning picks by it (params.yaml validate.dialogues);
    # keys added since, at what the pipeline did before them: DialogSum's own column names and its three
    # splits (nothing is split off), and a fixed date for templates that print one
    columns = {"id": "id", "dialogue": "dialogue", "summary": "summary", "topic": "topic"}
    before = {
        **BEFORE,
        "validate": {**BEFORE["validate"], "dialogues": 500},
        "data": {**BEFORE["data"], "columns": columns, "split_seed": 0, "validation_size": 0.1, "test_size": 0.1},
        "prepare": {**BEFORE["prepare"], "chat_date": "26 Jul 2024"},
    }
    assert {k: v for k, v in dataclasses.asdict(params).items() if k not in skip} == {
        k: v for k, v in before.items() if not k.startswith("train_") and k not in ("lora", "ia3", "prompt", "variants")
    }
    assert {m: params.method(m).type for m in params.methods} == {
        "full": "full",
        "lora": "lora",
        "ia3": "ia3",
        "prompt": "prompt_tuning",
    }


def method_sections(raw: dict) -> dict[str, dict]:
    return {name: section for name, section in raw.items() if isinstance(section, dict) and "type" in section}


def test_no_two_method_sections_repeat_more_than_three_identical_pairs(raw):
    sections = method_sections(raw)
    assert set(sections) >= {"full", "lora", "ia3", "prompt", "prefix", "loha", "vera"}
    for (a, first), (b, second) in itertools.combinations(sections.items(), 2):
        shared = {k for k in first if k != "type" and k in second and first[k] == second[k]}
        assert len(shared) <= 3, f"{a} and {b} both set {sorted(shared)}: move them to `train`"


def test_a_method_section_holds_only_what_differs_from_the_shared_recipe(raw):
    for name, section in method_sections(raw).items():
        same = [k for k, v in section.items() if k in raw["train"] and raw["train"][k] == v]
        assert not same, f"{name} repeats the shared recipe's {same}"


def test_a_shared_change_reaches_every_method_and_a_method_change_only_that_method(raw):
    raw["train"]["epochs"] = 1
    raw["lora"]["learning_rate"] = 3.0e-4
    params = parse_params(raw)
    assert {m: params.recipe(m).epochs for m in params.methods} == dict.fromkeys(params.methods, 1.0)
    assert params.recipe("lora").learning_rate == 3.0e-4
    assert {m: params.recipe(m).learning_rate for m in ("full", "ia3", "prompt")} == {
        "full": 1.0e-4,
        "ia3": 8.0e-3,
        "prompt": 3.0e-1,
    }


def test_a_per_method_recipe_section_of_the_old_layout_is_refused_with_the_new_key(raw):
    raw["train_lora"] = {"learning_rate": 3.0e-4}  # what `dvc exp run -S train_lora.learning_rate=...` writes
    assert (
        "train_lora: per-method recipe sections are gone; put what differs from the shared `train` section "
        "in the method's own section (e.g. lora.learning_rate: ...; -S lora.learning_rate=...)"
    ) in problems(raw)


def test_methods_must_name_sections_and_variants_trained_methods(raw):
    raw["methods"] = ["full", "lora", "dora"]
    raw["variants"] = ["base", "full", "lora", "loha", "lead"]
    message = problems(raw)
    assert (
        "variants: base, lead is a baseline, not a trained method; list it in baselines (baselines: [base, lead])"
        in message
    )
    assert "methods: dora has no section; add one, e.g. dora: {type: loha, learning_rate: 1.0e-3, r: 8}" in message
    assert "variants: loha is not trained; add it to methods too (-S 'methods=[full, lora, dora, loha]')" in message


def test_a_section_without_a_type_is_an_unknown_section(raw):
    raw["lorra"] = {"r": 8}
    assert "lorra: unknown section; a method section is a mapping with a type (e.g. lorra: {type: lora, ...})" in (
        problems(raw)
    )


def test_a_curated_section_adds_to_the_axis_by_name_alone(raw):
    raw["methods"] = [*raw["methods"], "loha"]
    raw["variants"] = list(raw["methods"])
    params = parse_params(raw)
    loha = params.method("loha")
    assert (loha.type, loha.label, loha.config.args) == ("loha", "LoHa", {"r": 8, "alpha": 8, "target_modules": "auto"})
    assert loha.recipe.learning_rate == 1.0e-3 and loha.recipe.epochs == params.train["epochs"]


@pytest.mark.parametrize(
    ("name", "kind", "label"),
    [("lora", "lora", "LoRA"), ("prompt", "prompt_tuning", "prompt tuning"), ("lora_r8", "lora", "lora_r8 (LoRA)")],
)
def test_method_labels(name, kind, label):
    from stages.method_params import method_label

    assert method_label(name, kind) == label


def stages_imports(path: Path) -> set[str]:
    """The project modules (stages.*, scripts) a file imports anywhere in it, as module names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "stages":
            if (
                node.module == "stages"
                or (REPO / "stages" / node.module.removeprefix("stages.").replace(".", "/")).is_dir()
            ):
                found |= {f"{node.module}.{a.name}" for a in node.names}  # from stages import family
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "stages"}
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_among_stages_and_scripts():
    files = [*(REPO / "stages").rglob("*.py"), *(REPO / "scripts").glob("*.py")]
    modules = {module_name(f): f for f in files}
    graph = {m: {i for i in stages_imports(f) if i in modules and i != m} for m, f in modules.items()}
    # importing stages.x also runs the package's __init__, which imports no project module (asserted)
    assert graph["stages"] == set()

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, route = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*route, start]
                if nxt not in route:
                    stack.append((nxt, [*route, nxt]))
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m))]
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_the_stage_of_an_unknown_method_exits_2_naming_the_methods(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    result = run_bare_stage(tmp_path, "stages.launch", "dora", "42")
    assert result.returncode == 2
    assert result.stderr == "error: unknown method 'dora'; params.yaml methods are full, lora, ia3, prompt\n"


def test_dvc_yaml_names_no_method(tmp_path):
    text = (REPO / "dvc.yaml").read_text()
    for name in method_sections(yaml.safe_load((REPO / "params.yaml").read_text())):
        assert f"/{name}" not in text and f"_{name}" not in text and f"@{name}" not in text, name


def test_bytecode_caches_are_not_part_of_a_folder_dep():
    """dvc.yaml's train stage depends on the folder stages/methods: its __pycache__ must not count, or a
    fresh clone or another Python version would see every training stage as changed."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "check-ignore", "stages/methods/__pycache__/lora.cpython-311.pyc"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "__pycache__" in result.stdout, result.stdout + result.stderr
