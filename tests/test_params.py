"""params.yaml loading: the committed file is valid, and every kind of mistake is reported."""

from __future__ import annotations

import copy

import pytest
import yaml

from stages.params import load_params, parse_params
from tests.conftest import REPO, problems, run_bare_stage


def test_committed_params_load_with_defaults():
    params = load_params(REPO / "params.yaml")
    assert params.model.name == "google/flan-t5-base"
    assert params.data.source == "knkarthick/dialogsum"
    lora = params.method("lora").config
    assert (lora.r, lora.alpha, lora.dropout) == (32, 32, 0.05)
    assert lora.target_modules == "auto"
    assert params.recipe("full").learning_rate == pytest.approx(1.0e-4)
    assert params.recipe("lora").learning_rate == pytest.approx(1.0e-3)
    assert params.prepare.prompt_template == "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "


def test_every_param_has_a_comment():
    for number, line in enumerate((REPO / "params.yaml").read_text().splitlines(), start=1):
        if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert " # " in line, f"params.yaml:{number} has no comment: {line!r}"


def test_out_of_range_values_are_all_reported_at_once(raw):
    raw["lora"]["r"] = 0
    raw["lora"]["dropout"] = 1.0
    raw["full"]["learning_rate"] = -1.0
    raw["lora"]["batch_size"] = 0
    message = problems(raw)
    assert message.startswith("4 problem(s) in params.yaml:")
    assert "lora.r: must be >= 1, got 0" in message
    assert "lora.dropout: must be in [0, 1), got 1.0" in message
    assert "full.learning_rate: must be > 0, got -1.0" in message
    assert "lora.batch_size: must be >= 1, got 0" in message


def test_a_shared_problem_is_reported_once_under_train(raw):
    raw["train"]["epochs"] = 0
    raw["train"]["learning_rate"] = 1.0e-4  # per method, never shared
    message = problems(raw)
    assert message == (
        "2 problem(s) in params.yaml:\n"
        "  - train.learning_rate: set per method, not shared; put it in each method's section (e.g. lora.learning_rate)\n"
        "  - train.epochs: must be > 0, got 0.0"
    )


def test_a_method_without_its_learning_rate_is_told_to_set_it(raw):
    del raw["full"]["learning_rate"]
    assert "full.learning_rate: missing; add it to params.yaml" in problems(raw)


def test_unknown_key_names_the_valid_ones(raw):
    raw["lora"]["rank"] = 16
    message = problems(raw)
    assert (
        "lora.rank: unknown key for method type lora; valid keys are alpha, auto_find_batch_size, batch_size, "
        in message
    )
    # the type's own keys and the recipe's, which a method section may set too
    listed = message.split("valid keys are ")[1].splitlines()[0].split(", ")
    assert {"r", "alpha", "dropout", "target_modules", "use_dora", "quantization", "type", "learning_rate"} <= set(
        listed
    )
    assert "epochs" in listed and "rank" not in listed


def test_missing_key_and_section(raw):
    del raw["lora"]["alpha"]
    del raw["report"]
    message = problems(raw)
    assert "lora.alpha: missing; add it to params.yaml" in message
    assert "report: missing; add it to params.yaml" in message


def test_wrong_types(raw):
    raw["lora"]["r"] = "16"
    raw["train"]["group_by_length"] = "yes"
    raw["lora"]["target_modules"] = "q"
    raw["data"]["limit"] = 1.5
    message = problems(raw)
    assert "lora.r: expected an integer, got '16'" in message
    assert "train.group_by_length: expected true or false, got 'yes'" in message
    assert "lora.target_modules: expected a list of strings or one of 'all-linear', 'auto', got 'q'" in message
    assert "data.limit: expected an integer or null, got 1.5" in message


def test_yaml_float_without_dot_gets_a_hint(raw):
    raw["lora"]["learning_rate"] = "1e-4"  # what PyYAML makes of `1e-4`
    assert (
        "lora.learning_rate: expected a number, got '1e-4' (PyYAML reads numbers like 1e-4 as strings: write 1.0e-4)"
    ) in problems(raw)


def test_fp16_is_refused(raw):
    raw["train"]["precision"] = "fp16"
    assert "train.precision: expected one of 'auto', 'bf16', 'fp32', got 'fp16'" in problems(raw)


def test_prompt_without_placeholder(raw):
    raw["prepare"]["prompt_template"] = "Summarize:"
    assert "prepare.prompt_template: must contain the placeholder {dialogue}" in problems(raw)


def test_ints_are_accepted_where_floats_are_expected(raw):
    raw["full"]["weight_decay"] = 0
    raw["ia3"]["learning_rate"] = 1
    params = parse_params(copy.deepcopy(raw))
    assert params.recipe("full").weight_decay == 0.0 and isinstance(params.recipe("full").weight_decay, float)
    assert params.recipe("ia3").learning_rate == 1.0 and isinstance(params.recipe("ia3").learning_rate, float)


def test_stage_exits_2_with_the_message_before_any_work(tmp_path, raw):
    raw["lora"]["r"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = run_bare_stage(tmp_path, "stages.data")
    assert result.returncode == 2
    assert result.stderr == "error: 1 problem(s) in params.yaml:\n  - lora.r: must be >= 1, got 0\n"
    assert not (tmp_path / "data").exists()


def test_scheduler_typo_is_caught_with_the_other_params(raw):
    raw["full"]["lr_scheduler"] = "cosin"
    raw["lora"]["precision"] = "fp16"
    message = problems(raw)
    assert message.startswith("2 problem(s) in params.yaml:")
    assert (
        "full.lr_scheduler: expected one of 'linear', 'cosine', 'cosine_with_restarts', 'polynomial', "
        "'constant', 'constant_with_warmup', 'inverse_sqrt', got 'cosin'"
    ) in message
    assert "lora.precision: expected one of 'auto', 'bf16', 'fp32', got 'fp16'" in message


def test_every_accepted_scheduler_is_one_transformers_builds_from_its_name():
    import typing

    from transformers import SchedulerType

    from stages.method_params import LR_SCHEDULERS

    assert set(typing.get_args(LR_SCHEDULERS)) <= {s.value for s in SchedulerType}


def test_generation_bounds_are_checked(raw):
    raw["generate"].update(min_new_tokens=200, length_penalty=0.0, repetition_penalty=-1.0)
    message = problems(raw)
    assert "generate.min_new_tokens: must be in [0, max_new_tokens=128], got 200" in message
    assert "generate.length_penalty: must be > 0 (1.0 = plain average log-probability), got 0.0" in message
    assert "generate.repetition_penalty: must be > 0 (1.0 = off), got -1.0" in message
