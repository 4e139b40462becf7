"""What a person watching a run sees: compact progress lines and step-level TensorBoard scalars.

Keras' own progress bar printed every logged metric (19 for a three-head DHM
model) with ANSI codes and carriage returns after every step: ~0.8 KB per
step, ~51 MB of log for one Table 1 ResNet run and ~360 MB for 90 ImageNet
epochs, unreadable in a log file. The trainer passes ``verbose=0`` to `fit`
and uses `ProgressLogger` instead:

* every `every_steps` steps one line: epoch, step, loss and B0 top-1 over
  those steps, learning rate, images/s and the ETA of the whole run (not of
  the epoch; a resumed run counts from where it resumed);
* after every epoch one line with the epoch's training and evaluation summary;
* in a terminal the step line is one line rewritten in place (carriage
  return, at most once a second); anywhere else (a log file, CI, a cluster
  job) only whole lines are printed, never a carriage return or an ANSI code.

Everything per head and per mimicking pair stays in TensorBoard.
`StepSummaries` adds step-level scalars there (``step_loss``,
``step_learning_rate``, ``step_steps_per_second``,
``step_images_per_second``, x-axis: optimizer steps) and the operative Gin
configuration as a text summary; `EpochTensorBoard` is Keras' per-epoch
writer without its ``evaluation_<metric>_vs_iterations`` copies of every
validation metric.
"""

from __future__ import annotations

import sys
import time
from typing import Dict, Optional, Sequence, TextIO

import keras
import tensorflow as tf


class IntervalMeans:
    """Means over the steps since the last call, from Keras' running means.

    Keras reports each metric after a batch as its mean over the epoch so far;
    the mean over steps j+1..k of an epoch is (k * m_k - j * m_j) / (k - j).
    That shows what the model does now rather than an average dragged by the
    epoch's first steps. Intervals do not cross epochs (the means restart).
    """

    def __init__(self):
        self._last: Dict[str, tuple] = {}

    def reset(self) -> None:
        """At an epoch's start: Keras restarts its running means."""
        self._last = {}

    def update(self, batch: int, logs: dict, keys: Sequence[str]) -> Dict[str, float]:
        seen = batch + 1
        means = {}
        for key in keys:
            if key not in (logs or {}):
                continue
            mean = float(logs[key])
            last_seen, last_mean = self._last.get(key, (0, 0.0))
            if last_seen >= seen:  # no reset() at a new epoch: the mean restarted
                last_seen, last_mean = 0, 0.0
            means[key] = (seen * mean - last_seen * last_mean) / (seen - last_seen)
            self._last[key] = (seen, mean)
        return means


def learning_rate(model: keras.Model) -> float:
    """The optimizer's current learning rate (its schedule at the current step)."""
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def duration(seconds: float) -> str:
    """'1h02m', '4m05s', '12s'."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# Shown when logged (exact names; a task adds its own, e.g. rank1 and mAP).
TRAIN_METRICS = ("loss", "top1/b0")
EVAL_METRICS = ("loss", "top1/b0", "top5/b0")


def _number(value: float) -> str:
    return f"{value:.4g}"


class ProgressLogger(keras.callbacks.Callback):
    """Compact progress lines on stdout (see the module docstring).

    Args:
      batch_size: global batch size, for images/s.
      every_steps: steps between step lines (not in a terminal).
      verbose: 1 step and epoch lines, 2 epoch lines only, 0 nothing.
      metrics: training metrics shown per step and per epoch (if logged).
      eval_metrics: validation metrics shown per epoch (without "val_"), those
        logged; exact names, not prefixes.
      stream: where to write (default sys.stdout); `terminal` overrides
        the stream's isatty().
    """

    def __init__(
        self,
        batch_size: int,
        every_steps: int = 100,
        verbose: int = 1,
        metrics: Sequence[str] = TRAIN_METRICS,
        eval_metrics: Sequence[str] = EVAL_METRICS,
        stream: Optional[TextIO] = None,
        terminal: Optional[bool] = None,
    ):
        super().__init__()
        self.batch_size, self.every, self.verbose = int(batch_size), int(every_steps), int(verbose)
        self.metrics = list(dict.fromkeys(metrics))
        self.eval_metrics = list(dict.fromkeys(eval_metrics))
        self.stream = stream
        self.terminal = terminal
        self._means = IntervalMeans()

    # -- output -----------------------------------------------------------------
    def _out(self) -> TextIO:
        return self.stream or sys.stdout

    def _is_terminal(self) -> bool:
        if self.terminal is not None:
            return self.terminal
        isatty = getattr(self._out(), "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # a closed stream
            return False

    def _write(self, text: str) -> None:
        out = self._out()
        out.write(text)
        out.flush()

    # -- bookkeeping --------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self.epochs = int(self.params.get("epochs") or 1)
        self.steps = int(self.params.get("steps") or 0)
        self.total = self.epochs * self.steps
        self._tty = self._is_terminal()
        self._start = None  # (global step, time) after the first step: tracing is not timed
        self._line_open = False
        self._last_refresh = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self._means.reset()
        self._epoch_start = time.monotonic()
        self._interval_start = (0, time.monotonic())

    def _global_step(self, batch: int) -> int:
        return self.epoch * self.steps + batch + 1

    def _eta(self, done: int) -> str:
        if self._start is None or done <= self._start[0]:
            return "?"
        rate = (done - self._start[0]) / max(time.monotonic() - self._start[1], 1e-9)
        return duration((self.total - done) / rate)

    def on_train_batch_end(self, batch, logs=None):
        done = self._global_step(batch)
        now = time.monotonic()
        if self._start is None:
            self._start = (done, now)
            self._interval_start = (batch + 1, now)
        if self.verbose != 1:
            return
        due = (now - self._last_refresh >= 1.0) if self._tty else (done % self.every == 0)
        if not due or batch + 1 == self.steps:  # the epoch line follows at once
            return
        means = self._means.update(batch, logs, self.metrics)
        first, since = self._interval_start
        images = (batch + 1 - first) * self.batch_size / max(now - since, 1e-9) if batch + 1 > first else None
        self._interval_start = (batch + 1, now)
        self._last_refresh = now
        parts = [f"epoch {self.epoch + 1}/{self.epochs}", f"step {batch + 1}/{self.steps}"]
        parts += [f"{k} {_number(v)}" for k, v in means.items()]
        parts.append(f"lr {_number(learning_rate(self.model))}")
        if images is not None:
            parts.append(f"{images:.1f} img/s")
        parts.append(f"ETA {self._eta(done)}")
        line = "  ".join(parts)
        if self._tty:
            self._write("\r" + line.ljust(getattr(self, "_width", 0)))
            self._width, self._line_open = len(line), True
        else:
            self._write(line + "\n")

    def on_epoch_end(self, epoch, logs=None):
        if self.verbose == 0:
            return
        logs = logs or {}
        done = (epoch + 1) * self.steps
        seconds = time.monotonic() - self._epoch_start
        parts = [f"epoch {epoch + 1}/{self.epochs} done in {duration(seconds)}:"]
        parts += [f"{k} {_number(float(logs[k]))}" for k in self.metrics if k in logs]
        evaluated = [f"{k} {_number(float(logs['val_' + k]))}" for k in self.eval_metrics if "val_" + k in logs]
        if evaluated:
            parts.append("| eval " + "  ".join(evaluated))
        parts.append(f"| {self.steps * self.batch_size / max(seconds, 1e-9):.1f} img/s")
        if epoch + 1 < self.epochs:
            parts.append(f"ETA {self._eta(done)}")
        line = "  ".join(parts)
        if self._line_open:
            line = "\r" + line.ljust(getattr(self, "_width", 0))
            self._line_open = False
        self._write(line + "\n")


class StepSummaries(keras.callbacks.Callback):
    """Step-level TensorBoard scalars every `every_steps` optimizer steps, and
    the operative Gin configuration as text, in `log_dir` (logs/train).

    Keras' TensorBoard callback with update_freq=N would write every logged
    metric again under ``batch_*`` (running epoch means, not the recent
    steps); here only what a person follows during a run: the loss over the
    last steps, the learning rate, and the throughput.
    """

    def __init__(self, log_dir: str, batch_size: int, every_steps: int = 100, config_text: Optional[str] = None):
        super().__init__()
        self.log_dir, self.batch_size, self.every = log_dir, int(batch_size), int(every_steps)
        self.config_text = config_text
        self._means = IntervalMeans()
        self._writer = None

    def on_train_begin(self, logs=None):
        self._writer = tf.summary.create_file_writer(self.log_dir)
        self._last = None
        if self.config_text:
            # Markdown: indented lines keep Gin's layout in TensorBoard's Text tab.
            text = "\n".join("    " + line for line in self.config_text.splitlines())
            with self._writer.as_default():
                tf.summary.text("operative_config", text, step=int(self.model.optimizer.iterations.numpy()))
            self._writer.flush()

    def on_epoch_begin(self, epoch, logs=None):
        self._means.reset()

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        now = time.monotonic()
        # The first step of a process (tracing) or of an epoch (evaluation and
        # epoch-end callbacks before it) starts a new timing; it is not timed.
        timed = self._last is not None and batch > 0
        if step % self.every:
            if not timed:
                self._last = (step, now)
            return
        loss = self._means.update(batch, logs, ("loss",)).get("loss")
        with self._writer.as_default():
            if loss is not None:
                tf.summary.scalar("step_loss", loss, step=step)
            tf.summary.scalar("step_learning_rate", learning_rate(self.model), step=step)
            if timed and step > self._last[0]:
                steps_per_second = (step - self._last[0]) / max(now - self._last[1], 1e-9)
                tf.summary.scalar("step_steps_per_second", steps_per_second, step=step)
                tf.summary.scalar("step_images_per_second", steps_per_second * self.batch_size, step=step)
        self._last = (step, now)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """Keras' per-epoch TensorBoard writer without ``evaluation_<metric>_vs_iterations``.

    Keras writes every validation metric twice into logs/validation: as
    ``epoch_<metric>`` (x: epoch) and as ``evaluation_<metric>_vs_iterations``
    (x: optimizer step), doubling the validation tags (19 -> 38 for three
    heads). The epoch ones are kept; step-level views are `StepSummaries`'.
    """

    def on_test_end(self, logs=None):
        self._pop_writer()
