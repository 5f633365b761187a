"""Every metric a study can optimise, with its direction declared once.

Objectives, Pareto fronts and reports read the direction from here, so "is
lower better?" is never decided twice. A metric's value is looked up in a
trial record's ``metrics`` (task results) or ``profile`` (cost) section.

Task metrics also say which split they are measured on. Training selects its
epoch on validation (``qlsearch.train``); ``val_*`` metrics are measured there,
and each has a ``test_*`` twin measured at the same selected epoch, reported
beside it and never searched on (a study refuses a ``test`` objective unless it
opts in with ``allow_test_selection``). ``best_test_*`` is the paper's protocol:
the lowest test loss over all epochs, i.e. the test set choosing the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlsearch._registry import Registry


@dataclass(frozen=True)
class Metric:
    name: str
    direction: str  # "minimize" | "maximize"
    label: str  # axis label, with its unit
    section: str  # where a trial record keeps it: "metrics" | "profile"

    @property
    def higher_is_better(self) -> bool:
        return self.direction == "maximize"

    @property
    def split(self) -> str | None:
        """The data split a task metric is measured on: "train" | "val" | "test" (None: a cost)."""
        if self.section != "metrics":
            return None
        return next((s for s in ("train", "val", "test") if f"{s}_" in self.name), None)

    @property
    def selects_on_test(self) -> bool:
        """True when optimising this metric would let the test set choose (epochs or settings)."""
        return self.split == "test"


def _metrics(*rows: tuple[str, str, str, str]) -> dict[str, Metric]:
    return {name: Metric(name, direction, label, section) for name, direction, label, section in rows}


METRICS: dict[str, Metric] = _metrics(
    # at the epoch selected on validation
    ("val_mse", "minimize", "validation MSE", "metrics"),
    ("test_mse", "minimize", "test MSE (epoch selected on validation)", "metrics"),
    ("train_mse", "minimize", "train MSE (epoch selected on validation)", "metrics"),
    ("val_loss", "minimize", "validation loss", "metrics"),
    ("test_loss", "minimize", "test loss (epoch selected on validation)", "metrics"),
    ("train_loss", "minimize", "train loss (epoch selected on validation)", "metrics"),
    ("val_accuracy", "maximize", "validation accuracy", "metrics"),
    ("val_accuracy_norm", "maximize", "validation accuracy (length-normalised)", "metrics"),
    ("test_accuracy", "maximize", "test accuracy (epoch selected on validation)", "metrics"),
    ("test_accuracy_norm", "maximize", "test accuracy (length-normalised)", "metrics"),
    # over all epochs (the paper's protocol; best_test_* lets the test set pick the epoch)
    ("best_test_mse", "minimize", "best test MSE (epoch chosen on test)", "metrics"),
    ("final_test_mse", "minimize", "final test MSE", "metrics"),
    ("best_train_mse", "minimize", "best train MSE", "metrics"),
    ("final_train_mse", "minimize", "final train MSE", "metrics"),
    ("best_test_loss", "minimize", "best test loss (epoch chosen on test)", "metrics"),
    ("final_test_loss", "minimize", "final test loss", "metrics"),
    ("gradient_concentration", "minimize", "gradient concentration index (max/mean)", "metrics"),
    # both measured quietly per configuration, at the trial's test batch (its size is in the record)
    ("forward_ms", "minimize", "forward latency (ms per batch)", "profile"),
    ("forward_ratio", "minimize", "forward latency / PEFT LoRA r=8", "profile"),
    ("trainable_params", "minimize", "trainable parameters", "profile"),
    ("stored_bytes", "minimize", "adapter size (bytes)", "profile"),
    ("flops", "minimize", "FLOPs per forward", "profile"),
    ("peak_memory_bytes", "minimize", "peak memory (bytes)", "profile"),
)

#: Timed quietly per configuration, so measured only when a study profiles (``profile = true``);
#: the counts (parameters, bytes, FLOPs) are measured on every trial.
LATENCY_METRICS = ("forward_ms", "forward_ratio")


#: The built-ins, or a ``Metric`` installed as an entry point of ``qlsearch.metrics`` (its name
#: is the key a trial record keeps it under, so a metric is named by its name, never by reference).
METRIC_REGISTRY: Registry[Metric] = Registry("metric", "objective", "qlsearch.metrics", Metric, METRICS,
                                             references=False)


def get_metric(name: str) -> Metric:
    return METRIC_REGISTRY.get(name)


def metric_value(record: dict, name: str) -> float | None:
    """The metric ``name`` of a trial record, or None when the record lacks it."""
    value = record.get(get_metric(name).section, {}).get(name)
    return None if value is None else float(value)


def test_twin(metric: Metric) -> Metric | None:
    """The ``test_*`` metric reported beside a ``val_*`` objective (``val_mse`` → ``test_mse``)."""
    if metric.split != "val":
        return None
    return METRICS.get(metric.name.replace("val_", "test_", 1))


def reported_beside(objectives: list[str]) -> list[str]:
    """The ``test_*`` twins of the ``val_*`` objectives: shown beside them, never optimised."""
    twins = [test_twin(METRICS[m]) for m in objectives if m in METRICS]
    return [t.name for t in twins if t is not None and t.name not in objectives]
