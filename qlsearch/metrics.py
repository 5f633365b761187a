"""Every metric a study can optimise, with its direction declared once.

Objectives, Pareto fronts and reports read the direction from here, so "is
lower better?" is never decided twice. A metric's value is looked up in a
trial record's ``metrics`` (task results) or ``profile`` (cost) section.
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


def _metrics(*rows: tuple[str, str, str, str]) -> dict[str, Metric]:
    return {name: Metric(name, direction, label, section) for name, direction, label, section in rows}


METRICS: dict[str, Metric] = _metrics(
    ("best_test_mse", "minimize", "best test MSE", "metrics"),
    ("final_test_mse", "minimize", "final test MSE", "metrics"),
    ("best_train_mse", "minimize", "best train MSE", "metrics"),
    ("final_train_mse", "minimize", "final train MSE", "metrics"),
    ("best_test_loss", "minimize", "best test loss", "metrics"),
    ("final_test_loss", "minimize", "final test loss", "metrics"),
    ("test_accuracy", "maximize", "test accuracy", "metrics"),
    ("test_accuracy_norm", "maximize", "test accuracy (length-normalised)", "metrics"),
    ("train_accuracy", "maximize", "train accuracy", "metrics"),
    ("gradient_concentration", "minimize", "gradient concentration index (max/mean)", "metrics"),
    ("forward_ms", "minimize", "forward latency (ms)", "profile"),
    ("trainable_params", "minimize", "trainable parameters", "profile"),
    ("stored_bytes", "minimize", "adapter size (bytes)", "profile"),
    ("flops", "minimize", "FLOPs per forward", "profile"),
    ("peak_memory_bytes", "minimize", "peak memory (bytes)", "profile"),
)


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
