"""stages.progress: exact periodic lines off a terminal (fake clock, no sleeping), a tqdm bar on
one, the Trainer callback driven through its hooks (fresh run and resume), the generation
callback and the download wrapper."""

from __future__ import annotations

import io

import pytest
from transformers import TrainerControl, TrainerState

from stages.progress import Progress, TrainerProgress, download_progress, format_duration, format_rate


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0s"),
        (9, "9s"),
        (9.99, "9s"),
        (59, "59s"),
        (60, "1m00s"),
        (252, "4m12s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (3720, "1h02m"),
        (90000, "25h00m"),
        (-3, "0s"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_rate():
    assert format_rate(None, "steps") == "? steps/s"
    assert format_rate(1.6, "dialogues") == "1.6 dialogues/s"
    assert format_rate(0.0125, "steps") == "0.0125 steps/s"
    assert format_rate(1234.5, "it") == "1234 it/s"


def test_lines_at_most_every_interval_with_exact_text():
    clock, out = FakeClock(), io.StringIO()
    with Progress(500, "generate@lora", unit="dialogues", stream=out, interval_s=30, clock=clock) as progress:
        for _ in range(6):  # 16 dialogues every 10 s: 96 after 60 s
            clock.advance(10)
            progress.update(16)
        assert lines(out) == [
            "generate@lora: 48/500 dialogues (9%) | 1.6 dialogues/s | elapsed 30s | ETA 4m42s",
            "generate@lora: 96/500 dialogues (19%) | 1.6 dialogues/s | elapsed 1m00s | ETA 4m12s",
        ]
        clock.advance(29)
        progress.update(1)  # 29 s after the last line: too soon
        assert len(lines(out)) == 2
        clock.advance(3000)
        progress.update(403)  # the total: left to the final line
        assert len(lines(out)) == 2
    assert lines(out)[2:] == ["generate@lora: 500/500 dialogues (100%) | 0.162 dialogues/s | elapsed 51m29s | done"]


def test_lines_follow_the_previous_line_not_a_fixed_grid():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(1000, "train", unit="steps", stream=out, interval_s=30, clock=clock)
    for wait in (45, 20, 20, 5):  # lines at 45 s and 85 s (40 s after 45), not at 65 s
        clock.advance(wait)
        progress.update()
    assert [line.split(" | ")[2] for line in lines(out)] == ["elapsed 45s", "elapsed 1m25s"]


def test_hours_eta_and_unknown_rate():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(1000, "train", unit="steps", stream=out, interval_s=30, clock=clock)
    clock.advance(60)
    progress.update(16)  # 984 steps left at 16 per minute
    assert lines(out) == ["train: 16/1000 steps (1%) | 0.267 steps/s | elapsed 1m00s | ETA 1h01m"]
    assert progress.line(clock(), final=False).endswith("ETA 1h01m")
    fresh = Progress(10, "x", stream=io.StringIO(), clock=clock)
    assert fresh.line(clock()) == "x: 0/10 it (0%) | ? it/s | elapsed 0s | ETA ?"


def test_final_line_says_stopped_when_closed_short_and_close_is_idempotent():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(10, "validation", unit="batches", stream=out, clock=clock)
    clock.advance(4)
    progress.update(2)
    progress.close()
    progress.close()
    progress.update(5)  # after close: ignored
    assert lines(out) == ["validation: 2/10 batches (20%) | 0.5 batches/s | elapsed 4s | stopped"]


def test_exception_inside_with_still_closes():
    clock, out = FakeClock(), io.StringIO()
    with pytest.raises(RuntimeError):
        with Progress(10, "generate@full", unit="dialogues", stream=out, clock=clock) as progress:
            clock.advance(2)
            progress.update(4)
            raise RuntimeError("out of memory")
    assert lines(out) == ["generate@full: 4/10 dialogues (40%) | 2 dialogues/s | elapsed 2s | stopped"]


def test_status_is_appended_and_leave_false_has_no_final_line():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(4, "train", unit="steps", stream=out, interval_s=1, clock=clock, leave=False)
    progress.set_status("loss 1.234")
    clock.advance(2)
    progress.update()
    progress.close()
    assert lines(out) == ["train: 1/4 steps (25%) | 0.5 steps/s | elapsed 2s | ETA 6s | loss 1.234"]


def test_zero_total_prints_nothing():
    clock, out, terminal = FakeClock(), io.StringIO(), Terminal()
    for stream in (out, terminal):
        with Progress(0, "generate@base", unit="dialogues", stream=stream, interval_s=0, clock=clock) as progress:
            clock.advance(100)
            progress.update(0)
            progress.update(3)
    assert out.getvalue() == "" and terminal.getvalue() == ""


def test_negative_total_is_refused():
    with pytest.raises(ValueError, match="total >= 0"):
        Progress(-1, "x", stream=io.StringIO())


def test_terminal_stream_gets_a_tqdm_bar():
    terminal = Terminal()
    with Progress(10, "generate@lora", unit="dialogues", stream=terminal, clock=FakeClock()) as progress:
        progress.set_status("beams 4")
        progress.write("a message above the bar")
        for _ in range(10):
            progress.update()
    text = terminal.getvalue()
    assert "\r" in text  # redrawn in place
    final = text.split("\r")[-1]
    assert final.startswith("generate@lora: 100%|") and "| 10/10 [" in final and "dialogues/s" in final
    assert "beams 4" in final
    assert "a message above the bar\n" in text


def test_generation_callback_moves_to_done_and_closes_at_total():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(100, "generate@lora", unit="dialogues", stream=out, interval_s=30, clock=clock)
    callback = progress.as_callback()
    for done in range(8, 97, 8):  # generate_summaries calls after each batch with (done, total)
        clock.advance(5)
        callback(done, 100)
    clock.advance(5)
    callback(100, 100)  # the total: the final line
    clock.advance(5)
    callback(100, 100)  # after close: nothing more
    assert lines(out) == [
        "generate@lora: 48/100 dialogues (48%) | 1.6 dialogues/s | elapsed 30s | ETA 32s",
        "generate@lora: 96/100 dialogues (96%) | 1.6 dialogues/s | elapsed 1m00s | ETA 2s",
        "generate@lora: 100/100 dialogues (100%) | 1.54 dialogues/s | elapsed 1m05s | done",
    ]
    assert progress.closed


def state(max_steps: int = 10, global_step: int = 0, main: bool = True) -> TrainerState:
    return TrainerState(max_steps=max_steps, global_step=global_step, is_world_process_zero=main)


class Args:
    output_dir = "checkpoints/lora"  # a training stage's checkpoint_dir (checkpoints/<method>)


def step(
    callback: TrainerProgress,
    s: TrainerState,
    control: TrainerControl,
    clock: FakeClock,
    seconds: float,
    logs: dict | None = None,
) -> None:
    """One optimizer step as the Trainer runs it: DefaultFlowCallback sets should_log before the
    other callbacks' on_step_end on a logging step, then the Trainer logs and clears it."""
    clock.advance(seconds)
    s.global_step += 1
    control.should_log = logs is not None
    callback.on_step_end(Args(), s, control)
    if logs is not None:
        callback.on_log(Args(), s, control, logs=logs)
        control.should_log = False


def test_trainer_progress_lines_loss_and_final_line():
    clock, out, control = FakeClock(), io.StringIO(), TrainerControl()
    callback = TrainerProgress(stream=out, interval_s=30, clock=clock)
    s = state()
    callback.on_train_begin(Args(), s, control)
    step(callback, s, control, clock, 20, logs={"loss": 1.5, "learning_rate": 0.0003, "grad_norm": 2.0})
    assert out.getvalue() == ""  # 20 s: before the first interval
    step(callback, s, control, clock, 20)
    step(callback, s, control, clock, 20, logs={"loss": 1.2345678, "learning_rate": 0.000297})
    for _ in range(7):
        step(callback, s, control, clock, 20)
    callback.on_log(Args(), s, control, logs={"train_runtime": 200.0, "train_loss": 1.1})  # end-of-run summary
    callback.on_train_end(Args(), s, control)
    assert lines(out) == [
        "lora: 2/10 steps (20%) | 0.05 steps/s | elapsed 40s | ETA 2m40s | loss 1.5, lr 0.0003",
        "lora: 4/10 steps (40%) | 0.05 steps/s | elapsed 1m20s | ETA 2m00s | loss 1.235, lr 0.000297",
        "lora: 6/10 steps (60%) | 0.05 steps/s | elapsed 2m00s | ETA 1m20s | loss 1.235, lr 0.000297",
        "lora: 8/10 steps (80%) | 0.05 steps/s | elapsed 2m40s | ETA 40s | loss 1.235, lr 0.000297",
        "lora: 10/10 steps (100%) | 0.05 steps/s | elapsed 3m20s | done | loss 1.235, lr 0.000297",
    ]


def test_trainer_progress_resume_counts_only_remaining_steps():
    clock, out, control = FakeClock(), io.StringIO(), TrainerControl()
    callback = TrainerProgress(desc="full", stream=out, interval_s=30, clock=clock)
    s = state(global_step=4)  # resumed from checkpoint-4
    callback.on_train_begin(Args(), s, control)
    step(callback, s, control, clock, 40, logs={"loss": 1.5})
    assert lines(out) == ["full: 5/10 steps (50%) | 0.025 steps/s | elapsed 40s | ETA 3m20s | loss 1.5"]


def test_trainer_progress_validation_line_and_eval_loss_in_status():
    clock, out, control = FakeClock(), io.StringIO(), TrainerControl()
    callback = TrainerProgress(stream=out, interval_s=30, clock=clock)
    s = state(max_steps=4)
    callback.on_train_begin(Args(), s, control)
    step(callback, s, control, clock, 5)
    step(callback, s, control, clock, 5, logs={"loss": 2.0})
    eval_batches = list(range(6))
    for _ in eval_batches:  # 10 s per batch: a periodic validation line after the 30 s interval
        clock.advance(10)
        callback.on_prediction_step(Args(), s, control, eval_dataloader=eval_batches)
    metrics = {"eval_loss": 1.87654, "eval_runtime": 60.0}
    callback.on_log(Args(), s, control, logs=metrics)
    callback.on_evaluate(Args(), s, control, metrics=metrics)
    step(callback, s, control, clock, 5)
    callback.on_train_end(Args(), s, control)
    assert lines(out) == [
        "validation: 4/6 batches (66%) | 0.1 batches/s | elapsed 30s | ETA 20s",  # the first batch starts its clock
        "validation after step 2/4: eval_loss 1.877 (6 batches in 50s)",
        "lora: 3/4 steps (75%) | 0.04 steps/s | elapsed 1m15s | ETA 25s | loss 2, eval_loss 1.877",
        "lora: 3/4 steps (75%) | 0.04 steps/s | elapsed 1m15s | stopped | loss 2, eval_loss 1.877",
    ]


def test_trainer_progress_is_silent_off_the_main_process():
    clock, out, control = FakeClock(), io.StringIO(), TrainerControl()
    callback = TrainerProgress(stream=out, interval_s=0, clock=clock)
    s = state(main=False)
    callback.on_train_begin(Args(), s, control)
    for _ in range(10):
        step(callback, s, control, clock, 5, logs={"loss": 1.0})
    callback.on_prediction_step(Args(), s, control, eval_dataloader=[1, 2])
    callback.on_evaluate(Args(), s, control, metrics={"eval_loss": 1.0})
    callback.on_train_end(Args(), s, control)
    assert out.getvalue() == ""


def test_trainer_progress_on_a_terminal_uses_tqdm_with_loss_postfix():
    terminal, control = Terminal(), TrainerControl()
    callback = TrainerProgress(stream=terminal, clock=FakeClock())
    s = state(global_step=4)
    callback.on_train_begin(Args(), s, control)
    for _ in range(6):
        s.global_step += 1
        callback.on_step_end(Args(), s, control)
        callback.on_log(Args(), s, control, logs={"loss": 1.5})
    callback.on_evaluate(Args(), s, control, metrics={"eval_loss": 1.25})
    callback.on_train_end(Args(), s, control)
    text = terminal.getvalue()
    assert "validation after step 10/10: eval_loss 1.25\n" in text
    final = text.split("\r")[-1]
    assert final.startswith("lora: 100%|") and "| 10/10 [" in final and "loss=1.5" not in final
    assert "loss 1.5" in final


def test_download_progress_lines_off_a_terminal_and_bars_restored():
    import datasets.utils as datasets_utils
    import huggingface_hub.utils as hub_utils

    clock, out = FakeClock(), io.StringIO()
    before = (datasets_utils.are_progress_bars_disabled(), hub_utils.are_progress_bars_disabled())
    with download_progress("knkarthick/dialogsum@abc123", stream=out, clock=clock):
        assert datasets_utils.are_progress_bars_disabled() and hub_utils.are_progress_bars_disabled()
        clock.advance(75)
    assert lines(out) == [
        "data: fetching knkarthick/dialogsum@abc123 (download bars show on a terminal only)",
        "data: fetched knkarthick/dialogsum@abc123 in 1m15s",
    ]
    assert (datasets_utils.are_progress_bars_disabled(), hub_utils.are_progress_bars_disabled()) == before

    out = io.StringIO()
    with pytest.raises(OSError):
        with download_progress("x", stream=out, clock=clock):
            clock.advance(3)
            raise OSError("offline")
    assert lines(out)[-1] == "data: fetching x failed after 3s"
    assert (datasets_utils.are_progress_bars_disabled(), hub_utils.are_progress_bars_disabled()) == before


def test_download_progress_on_a_terminal_leaves_the_library_bars_alone():
    terminal = Terminal()
    with download_progress("x", stream=terminal):
        pass
    assert terminal.getvalue() == ""
