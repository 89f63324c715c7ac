"""Progress for long work: training, validation, generation and the data download.

On a terminal (`dvc repro` passes it through) the work drives a live tqdm bar. When output is
not a terminal (CI logs, `dvc queue logs`), a bar redrawn with carriage returns would flood the
log, so one plain line is printed at most every `interval_s` seconds, plus a final line:

    generate@lora: 96/500 dialogues (19%) | 1.6 dialogues/s | elapsed 1m00s | ETA 4m12s
    generate@lora: 500/500 dialogues (100%) | 1.6 dialogues/s | elapsed 5m12s | done

Everything goes to stderr by default (stdout stays free for data: summarize.py prints summaries
there). Nothing here prints at import or keeps state outside the objects it returns.

- `Progress`: the bar or the lines, for any count of work (a context manager).
- `Progress.as_callback()`: a `progress(done, total)` callback for `generate_summaries`.
- `TrainerProgress`: a transformers callback showing optimizer steps, loss and validation.
- `download_progress`: the Hugging Face download bars on a terminal, a start and an end line
  otherwise.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, TextIO

from tqdm import tqdm
from transformers.trainer_callback import TrainerCallback, TrainerControl, TrainerState

Clock = Callable[[], float]


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


def format_duration(seconds: float) -> str:
    """9s, 4m12s, 1h02m (whole seconds, rounded down)."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_rate(rate: float | None, unit: str) -> str:
    if rate is None:
        return f"? {unit}/s"
    return f"{rate:.0f} {unit}/s" if rate >= 100 else f"{rate:.3g} {unit}/s"


class Progress:
    """Progress over `total` units of work: a tqdm bar on a terminal, periodic lines otherwise.

        with Progress(len(ids), "generate@lora", unit="dialogues") as progress:
            for batch in batches:
                ...
                progress.update(len(batch))

    `initial` counts work done before this run (a resumed training run): the bar starts there,
    and rate and ETA count only the work done by this run. Not on a terminal, a line is printed
    on `update` once `interval_s` seconds have passed since the start or the previous line, and a
    final line on `close` (ending in `done`, or `stopped` when closed short of the total) unless
    `leave` is False. `set_status` appends text (e.g. the latest loss) to the line or the bar.
    A total of 0 shows nothing. `clock` (seconds, monotonic) is injectable for tests; the tqdm
    bar keeps its own clock.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        stream: TextIO | None = None,
        interval_s: float = 30.0,
        clock: Clock = time.monotonic,
        initial: int = 0,
        leave: bool = True,
    ):
        if total < 0 or initial < 0:
            raise ValueError(f"Progress needs total >= 0 and initial >= 0, got total={total}, initial={initial}")
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s, self.clock, self.initial, self.leave = interval_s, clock, initial, leave
        self.n = initial
        self.status = ""
        self.closed = False
        self.started = clock()
        self._next_line = self.started + interval_s
        self._bar: tqdm | None = None
        if total > 0 and is_terminal(self.stream):
            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, file=self.stream, leave=leave, dynamic_ncols=True
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, refresh: bool = True) -> None:
        """Count `n` more units; with refresh=False, a line that falls due waits for `refresh()`
        (e.g. until the loss of this step is known)."""
        if self.closed or n == 0:
            return
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif refresh:
            self.refresh()

    def refresh(self) -> None:
        """Not on a terminal: print the line if `interval_s` has passed since the last one."""
        if self.closed or self._bar is not None:
            return
        now = self.clock()
        # the line at the total is close()'s final line
        if self.total > 0 and self.initial < self.n < self.total and now >= self._next_line:
            self._print(self.line(now))
            self._next_line = now + self.interval_s

    def set_status(self, text: str) -> None:
        """Text shown after the numbers: the bar's postfix, or the end of each line."""
        self.status = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def write(self, text: str) -> None:
        """Print one line of text without breaking the bar."""
        if self._bar is not None:
            tqdm.write(text, file=self.stream)
        else:
            self._print(text)

    def elapsed_s(self) -> float:
        return self.clock() - self.started

    def rate(self, now: float) -> float | None:
        """Units per second done by this run, or None before the first unit."""
        done, elapsed = self.n - self.initial, now - self.started
        return done / elapsed if done > 0 and elapsed > 0 else None

    def line(self, now: float, final: bool = False) -> str:
        """`desc: n/total unit (pct%) | rate | elapsed E | ETA T` (or `done`/`stopped` when final)."""
        rate = self.rate(now)
        percent = 100 * self.n // self.total if self.total else 100
        if final:
            end = "done" if self.n >= self.total else "stopped"
        else:
            end = f"ETA {format_duration((self.total - self.n) / rate)}" if rate else "ETA ?"
        parts = [
            f"{self.desc}: {self.n}/{self.total} {self.unit} ({percent}%)",
            format_rate(rate, self.unit),
            f"elapsed {format_duration(now - self.started)}",
            end,
        ]
        if self.status:
            parts.append(self.status)
        return " | ".join(parts)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.total > 0 and self.leave:
            self._print(self.line(self.clock(), final=True))

    def as_callback(self) -> Callable[[int, int], None]:
        """A `progress(done, total)` callback (generate_summaries' signature):
        it moves the count to `done` and closes this Progress once `done` reaches `total`."""

        def progress(done: int, total: int) -> None:
            if total != self.total:
                self.total = total
                if self._bar is not None:
                    self._bar.total = total
            self.update(done - self.n)
            if done >= total:
                self.close()

        return progress

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class TrainerProgress(TrainerCallback):
    """Training progress for a transformers Trainer, in place of its printed log dicts.

    Shows optimizer steps out of `state.max_steps` (from `state.global_step` on a resume, so
    rate and ETA count only the steps left), with the latest loss, learning rate and eval_loss,
    as a tqdm bar on a terminal or a line every `interval_s` seconds otherwise:

        lora: 120/1000 steps (12%) | 0.5 steps/s | elapsed 4m00s | ETA 29m20s | loss 1.234, lr 0.000297

    Validation runs show a second bar (cleared when done) or, if long, their own periodic lines;
    each ends with one line `validation after step 200/1000: eval_loss 1.2345 (63 batches in 12s)`.
    Only the main process (state.is_world_process_zero) prints. `desc` defaults to the name of
    the Trainer's output_dir (checkpoints/lora -> lora).

    Use it in a stage like this (keep `disable_tqdm=True` in the TrainingArguments, so the
    Trainer adds no bar of its own, then drop the PrinterCallback it adds instead):

        from transformers import PrinterCallback, ProgressCallback
        trainer = Trainer(..., callbacks=[TrainerProgress()])
        trainer.remove_callback(PrinterCallback)   # prints every log dict
        trainer.remove_callback(ProgressCallback)  # present when disable_tqdm=False
    """

    def __init__(
        self,
        desc: str | None = None,
        stream: TextIO | None = None,
        interval_s: float = 30.0,
        clock: Clock = time.monotonic,
    ):
        self.desc, self.stream, self.interval_s, self.clock = desc, stream, interval_s, clock
        self.training: Progress | None = None
        self.validation: Progress | None = None
        self.latest: dict[str, str] = {}

    def _progress(self, total: int, desc: str, unit: str, **kwargs) -> Progress:
        return Progress(
            total, desc, unit=unit, stream=self.stream, interval_s=self.interval_s, clock=self.clock, **kwargs
        )

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.training is not None:  # auto_find_batch_size restarts the loop after out-of-memory
            self.training.close()
        output_dir = getattr(args, "output_dir", None)
        desc = self.desc or (Path(output_dir).name if output_dir else "train")
        self.latest = {}
        self.training = self._progress(state.max_steps, desc, "steps", initial=state.global_step)

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero and self.training is not None:
            # on a logging step, the line waits for on_log, so it shows this step's loss
            self.training.update(state.global_step - self.training.n, refresh=not control.should_log)

    def on_log(self, args, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training is None or not logs:
            return
        for key, label, spec in (
            ("loss", "loss", ".4g"),
            ("learning_rate", "lr", ".3g"),
            ("eval_loss", "eval_loss", ".4g"),
        ):
            if isinstance(logs.get(key), (int, float)):
                self.latest[label] = format(logs[key], spec)
        self.training.set_status(", ".join(f"{label} {value}" for label, value in self.latest.items()))
        if "loss" in logs:  # the training log a logging step's line waited for (eval logs come with on_evaluate)
            self.training.refresh()

    def on_prediction_step(self, args, state: TrainerState, control: TrainerControl, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.validation is None:  # after the first batch, so rate and ETA leave its time out
            try:
                total = len(eval_dataloader)
            except TypeError:  # an iterable dataset has no length: count without a total
                total = 0
            self.validation = self._progress(total, "validation", "batches", initial=1, leave=False)
        else:
            self.validation.update()

    def on_evaluate(self, args, state: TrainerState, control: TrainerControl, metrics=None, **kwargs):
        if not state.is_world_process_zero:
            return
        text = f"validation after step {state.global_step}/{state.max_steps}:"
        if metrics and isinstance(metrics.get("eval_loss"), (int, float)):
            text += f" eval_loss {metrics['eval_loss']:.4g}"
        if self.validation is not None:
            text += f" ({self.validation.n} batches in {format_duration(self.validation.elapsed_s())})"
        self._close_validation()
        if self.training is not None and not self.training.closed:
            self.training.write(text)
        else:
            print(text, file=self.stream if self.stream is not None else sys.stderr, flush=True)

    def on_predict(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            self._close_validation()

    def on_train_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero and self.training is not None:
            self.training.close()
            self.training = None

    def _close_validation(self) -> None:
        if self.validation is not None:
            self.validation.close()
            self.validation = None


@contextlib.contextmanager
def download_progress(
    what: str, desc: str = "data", stream: TextIO | None = None, clock: Clock = time.monotonic
) -> Iterator[None]:
    """Around a Hugging Face download (`datasets.load_dataset`, `from_pretrained`) of `what`.

    On a terminal, the libraries' own tqdm bars show bytes done/total, rate and ETA: left as they
    are. Otherwise they would write carriage-return redraws into the log, so they are turned off
    for the duration (and restored after) and one line is printed at the start and one at the end:

        data: fetching knkarthick/dialogsum@<revision> (download bars show on a terminal only)
        data: fetched knkarthick/dialogsum@<revision> in 12s

    HF_DATASETS_DISABLE_PROGRESS_BARS / HF_HUB_DISABLE_PROGRESS_BARS, if set, still win.
    """
    stream = stream if stream is not None else sys.stderr
    if is_terminal(stream):
        yield
        return
    import datasets.utils as datasets_utils  # imported here: only downloads need them
    import huggingface_hub.utils as hub_utils

    started = clock()
    print(f"{desc}: fetching {what} (download bars show on a terminal only)", file=stream, flush=True)
    datasets_bars_were_on = not datasets_utils.are_progress_bars_disabled()
    with warnings.catch_warnings():  # the libraries warn when an environment variable overrides this
        warnings.simplefilter("ignore")
        datasets_utils.disable_progress_bars()
        hub_bars = hub_utils.disable_progress_bars()  # re-enables on __exit__ if it was on
    try:
        yield
    except BaseException:
        print(f"{desc}: fetching {what} failed after {format_duration(clock() - started)}", file=stream, flush=True)
        raise
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hub_bars.__exit__(None, None, None)
            if datasets_bars_were_on:
                datasets_utils.enable_progress_bars()
    print(f"{desc}: fetched {what} in {format_duration(clock() - started)}", file=stream, flush=True)
