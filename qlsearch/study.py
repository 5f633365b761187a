"""Study files (``studies/*.toml``): parsed once, at the edge, into a few typed objects.

What to run (task, training, seeds), the space (per-method knobs and fixed
baselines), the objectives, resources and storage are separate objects; inner
code never re-reads raw dictionaries. Every error names the field and the
allowed values.

A study file::

    name = "quickstart"
    seeds = [0, 1]                          # every configuration runs on each; objectives are means
    num_trials = 8                          # searched configurations, all methods together
    # trials_per_method = 8                 # or: the same budget for every searched method
    objectives = ["val_mse", "forward_ms", "trainable_params"]

    [task]          # as in a trial file
    kind = "synthetic"
    name = "dropwave"
    backbone = "mlp"

    [train]
    epochs = 30

    [space.queryable]
    r = [4, 8]                              # a list: categorical
    num_atoms = [4, 8]
    top_k = [1, 2, 4]                       # constrained: top_k <= num_atoms
    tau_lang = {low = 0.1, high = 10.0, log = true}   # a range
    num_blocks = 4                          # a scalar: fixed
    lr = {low = 1e-4, high = 1e-2, log = true}  # a training knob, per method (TRAIN_KNOBS)

    [[baselines]]
    method = "lora"
    knobs = {r = 8}

**Selection.** Objectives are measured on validation (``val_*``); a metric measured
on the test set (``Metric.selects_on_test``) is refused as an objective unless the
study sets ``allow_test_selection = true`` (e.g. to reproduce a paper that selected
on test), and the report then says so in its header.

**Budgets.** ``trials_per_method`` gives every method with a space the same number
of configurations (each run on every seed); ``num_trials`` is one total budget that
the sampler shares out between methods as it likes. Where a space has a finite
number of distinct configurations (lists, integer ranges, stepped ranges), the
budget is capped at that number (``Study.budget``): a configuration never runs twice
in a study, and a baseline inside a space counts as one of its configurations.

**Validation.** Every value is checked before anything is written or started,
against the knob declarations the adapters themselves use
(``qlsearch.adapters._knobs``): each list value, both ends of a range, the rules
between knobs (``top_k <= num_atoms``) for every combination the space can produce,
baselines' knobs, and the training knobs. Values are never coerced (``r = "8"`` is
an error).
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from qlsearch.adapters import get_method
from qlsearch.adapters._knobs import AtMost, Knob, check_values
from qlsearch.adapters._peft_any import describe, fits
from qlsearch.metrics import LATENCY_METRICS, METRICS, Metric, get_metric
from qlsearch.trial import TRAIN_KNOB_SPECS, TaskSpec, TrainSpec, _check_fields, check_targets

#: Study names and baseline labels become folder and file names: no ``.``/``..``, no separators.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
#: Knobs a study sets in one place for every method: searching them per method would contradict it.
STUDY_SETTINGS = {"target_modules": "task.targets", "seed": "seeds"}
SCHEDULERS = ("none", "asha")
#: How configurations are chosen. "tpe" (the default), "random" and "nsgaii" are Optuna's
#: samplers (TPE and NSGA-II handle several objectives; TPE also conditional spaces);
#: "grid" enumerates a space of lists (k <= M filtered), in a seeded random order, so a
#: small space is covered without running one configuration twice.
SAMPLERS = ("tpe", "random", "nsgaii", "grid")
#: Objectives known during training (ASHA can only stop trials on one of these).
EARLY_STOPPABLE = ("val_mse", "val_loss", "best_test_mse", "final_test_mse", "best_test_loss", "final_test_loss")
#: Training settings a space (or a baseline) may set per method, beside the method's own knobs;
#: a space's value overrides ``[train]``'s for that method.
TRAIN_KNOBS = tuple(TRAIN_KNOB_SPECS)
#: Spaces this large are sampled, never listed, when a repeat must be replaced.
LISTABLE = 100_000


@dataclass(frozen=True)
class Param:
    """One searched knob: categorical ``choices``, or an int/float range."""

    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def is_int(self) -> bool:
        return self.choices is None and all(isinstance(v, int) for v in (self.low, self.high))

    def values(self) -> list | None:
        """Every value it can take, or None for a continuous range."""
        if self.choices is not None:
            return list(self.choices)
        if self.is_int:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step:
            return [self.low + i * self.step for i in range(int((self.high - self.low) / self.step + 1e-9) + 1)]
        return None

    def size(self) -> int | None:
        if self.choices is not None:
            return len(self.choices)
        if self.is_int:
            return (int(self.high) - int(self.low)) // int(self.step or 1) + 1
        return int((self.high - self.low) / self.step + 1e-9) + 1 if self.step else None


@dataclass(frozen=True)
class MethodSpace:
    method: str
    params: tuple[Param, ...]
    fixed: dict
    rules: tuple[AtMost, ...] = ()  # the method's, e.g. top_k <= num_atoms
    defaults: dict = field(default_factory=dict)  # the method's knobs at their defaults

    def bound_of(self, param: Param) -> str | None:
        """The knob that bounds ``param`` in this space (``num_atoms`` for ``top_k``), if any."""
        names = {p.name for p in self.params} | set(self.fixed)
        return next((r.bound for r in self.rules if r.knob == param.name and r.bound in names), None)

    def size(self) -> int | None:
        """How many distinct configurations the space holds (rules applied); None: infinitely many."""
        sizes = {p.name: p.size() for p in self.params}
        if None in sizes.values():
            return None
        total = math.prod(sizes.values())
        for rule in self.rules:
            knob, bound = (next((p for p in self.params if p.name == n), None) for n in (rule.knob, rule.bound))
            if knob and bound:  # the pairs with knob <= bound replace the full product of the two
                kv = sorted(knob.values())
                pairs = sum(bisect.bisect_right(kv, b) for b in bound.values())
                total = total // (len(kv) * len(bound.values())) * pairs
        return total

    def points(self) -> typing.Iterator[dict]:
        """Every configuration of a finite space, rules applied, in order."""
        names = [p.name for p in self.params]
        for values in itertools.product(*(p.values() for p in self.params)):
            knobs = {**self.fixed, **dict(zip(names, values, strict=True))}
            if all(knobs[p.name] <= knobs[b] for p in self.params if (b := self.bound_of(p))):
                yield knobs

    def random_point(self, rng) -> dict:
        """One configuration drawn at random from a finite space (bounds drawn first)."""
        knobs = dict(self.fixed)
        for p in self.params:
            bound = self.bound_of(p)
            knobs[p.name] = rng.choice([v for v in p.values() if bound is None or v <= knobs[bound]])
        return knobs

    def contains(self, knobs: dict) -> bool:
        """Whether ``knobs`` (a baseline's, say) is one of this space's configurations."""
        same = _settings_key({**self.defaults, **self.fixed}) == _settings_key(
            {**self.defaults, **{k: v for k, v in knobs.items() if k not in {p.name for p in self.params}}})
        return same and all(p.name in knobs and _norm(knobs[p.name]) in map(_norm, p.values() or ())
                            for p in self.params)


def _norm(value):
    """A value as compared between configurations: ``16`` and ``16.0`` are one value."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list | tuple):
        return tuple(_norm(v) for v in value)
    return repr(value)


def _settings_key(knobs: dict) -> tuple:
    return tuple(sorted((k, _norm(v)) for k, v in knobs.items() if k not in STUDY_SETTINGS))


@dataclass(frozen=True)
class Budget:
    """The searched configurations a sweep runs: ``total`` (all methods), ``per_method`` with
    ``trials_per_method``; ``asked`` is the study file's number, ``note`` says why they differ."""

    total: int
    per_method: dict
    asked: int
    note: str = ""


@dataclass(frozen=True)
class Baseline:
    """A method at fixed settings, run on every seed and enqueued into the same study."""

    method: str
    knobs: dict
    label: str


@dataclass(frozen=True)
class Resources:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # fractional GPUs share one device; > 0 where Ray sees none: an error ...
    max_concurrent: int = 1
    cpu_fallback: bool = False  # ... unless this is set: trials then run on CPU, and say so


RESOURCE_SPECS = {"cpus_per_trial": Knob(float, low=0, low_open=True), "gpus_per_trial": Knob(float, low=0),
                  "max_concurrent": Knob(int, low=1), "cpu_fallback": Knob(bool)}


@dataclass(frozen=True)
class Drivers:
    """Several sweep drivers on one study (qlsearch/_drivers.py): each driver records a
    heartbeat for every trial it runs every ``heartbeat_seconds``; a running trial whose last
    heartbeat is older than ``grace_seconds`` has lost its driver and is run again."""

    heartbeat_seconds: int = 10
    grace_seconds: int = 60


@dataclass
class Study:
    name: str
    task: TaskSpec
    train: TrainSpec
    objectives: list[Metric]
    spaces: list[MethodSpace]
    baselines: list[Baseline] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    num_trials: int = 8
    resources: Resources = field(default_factory=Resources)
    drivers: Drivers = field(default_factory=Drivers)
    scheduler: str = "none"
    sampler: str = "tpe"
    storage: str | None = None  # None: sqlite file under the run folder
    trials_per_method: int | None = None  # None: num_trials is one budget for all searched methods
    allow_test_selection: bool = False  # a test metric may be an objective (the report says so)
    #: re-runs of a trial whose worker or node died, afresh on a node with room (a trial's own
    #: failure is final); past them it ends failed with the reason ("node died: ...")
    max_retries: int = 0
    #: time each configuration's latency quietly (forward_ms, forward_ratio); parameters,
    #: bytes and FLOPs are counted either way
    profile: bool = True
    description: str = ""
    #: the backbone pre-training cache; None: ``<root>/cache``; a relative path is under the root
    cache_dir: str | None = None
    #: how long a sweep retries an unreachable storage before it stops (its results kept on disk)
    storage_retry_seconds: float = 60.0
    path: str | None = None

    def grid(self) -> list[tuple[str, dict]]:
        """Every ``(method, knobs)`` of the spaces (lists only), ``k <= M`` enforced."""
        return [(space.method, knobs) for space in self.spaces for knobs in space.points()]

    def config_key(self, method: str, knobs: dict) -> tuple:
        """What makes two configurations the same: the method and every setting it runs with
        (knobs left out at the method's defaults, training knobs at ``[train]``'s)."""
        defaults = {**get_method(method).knobs, **{k: getattr(self.train, k) for k in TRAIN_KNOBS}}
        return method, _settings_key({**defaults, **knobs})

    def distinct(self, space: MethodSpace) -> int | None:
        """The space's configurations that are not already a baseline; None: infinitely many."""
        size = space.size()
        if size is None:
            return None
        return size - sum(b.method == space.method and space.contains(b.knobs) for b in self.baselines)

    def budget(self, extra: int = 0) -> Budget:
        """The budget (``extra`` trials added by ``--more``, per method with ``trials_per_method``),
        capped at the number of distinct configurations where that is finite."""
        sizes = {s.method: self.distinct(s) for s in self.spaces}
        asked = self.num_trials + extra
        if self.trials_per_method:
            wanted = self.trials_per_method + extra
            per = {m: wanted if n is None else min(wanted, n) for m, n in sizes.items()}
            total = sum(per.values())
            asked = wanted * len(sizes)
        else:
            per = {}
            finite = None not in sizes.values()
            total = min(asked, sum(sizes.values())) if finite else asked
        note = ""
        if total < asked:
            counts = ", ".join(f"{m} {n}" for m, n in sizes.items())
            note = (f"budget {asked} capped at {total} distinct configurations ({counts}, "
                    "a baseline's own configuration left out): a configuration never runs twice")
        return Budget(total, per, asked, note)

    def settings(self, knobs: dict) -> tuple[dict, TrainSpec]:
        """A configuration's adapter knobs, and the study's training settings with the
        configuration's training knobs (``lr``, ...) applied."""
        from dataclasses import replace

        train = {k: v for k, v in knobs.items() if k in TRAIN_KNOBS}
        return {k: v for k, v in knobs.items() if k not in TRAIN_KNOBS}, replace(self.train, **train)

    def names(self) -> list[str]:
        """The registry names this study uses: its task and methods (a sweep ships plug-ins)."""
        return [self.task.name, *(s.method for s in self.spaces), *(b.method for b in self.baselines)]

    @property
    def directions(self) -> list[str]:
        return [m.direction for m in self.objectives]

    def run_dir(self, root: str | Path = "runs") -> Path:
        from qlsearch._paths import inside

        return inside(root, self.name, what="study.name")

    def cache_path(self, root: str | Path = "runs") -> Path:
        """The pre-training cache, absolute: Ray's trial workers run in other folders."""
        return (Path(root) / (self.cache_dir or "cache")).resolve()

    def storage_url(self, root: str | Path = "runs") -> str:
        return self.storage or f"sqlite:///{(self.run_dir(root) / 'study.db').resolve()}"


_TOP_LEVEL = {"name", "description", "task", "train", "objectives", "space", "baselines", "seeds",
              "num_trials", "trials_per_method", "resources", "scheduler", "sampler", "storage", "max_retries",
              "storage_retry_seconds",
              "profile", "cache_dir", "allow_test_selection", "drivers"}


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"{where}: {message}")


def _table(data: dict, key: str, where: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise _fail(where, f"got {value!r}; allowed: a table ([{key}] or {key} = {{...}})")
    return value


def _check_types(cls, table: dict, where: str) -> None:
    """Unknown fields, then each value against its field's type hint (never coerced)."""
    _check_fields(cls, table, where)
    hints = typing.get_type_hints(cls)
    for name, value in table.items():
        if not fits(value, hints[name]):
            raise _fail(f"{where}.{name}", f"got {value!r}; allowed: {describe(hints[name])}")


def check_text(value, where: str, empty: bool = True) -> None:
    """Free text a person wrote (a description, an instruction): a string without control
    characters (a newline or tab is fine), non-empty unless ``empty``."""
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise _fail(where, f"got {value!r}; allowed: a{'' if empty else ' non-empty'} string")
    bad = next((c for c in value if ord(c) < 32 and c not in "\n\t" or 127 <= ord(c) < 160), None)
    if bad is not None:
        raise _fail(where, f"holds the control character {bad!r}; allowed: printable text (newlines, tabs)")


def check_name(value, where: str) -> None:
    if not (isinstance(value, str) and SAFE_NAME.fullmatch(value)):
        raise _fail(where, f"got {value!r}; allowed: a name of letters, digits, '-' and '_' that starts "
                    "with a letter or digit (no '.', '/', spaces)")


def _param(where: str, value, spec: Knob | None) -> Param | None:
    name = where.rsplit(".", 1)[-1]
    if isinstance(value, list):
        if not value:
            raise _fail(where, "an empty list; allowed: a non-empty list of values, a {low, high} range or a scalar")
        if len({repr(_norm(v)) for v in value}) != len(value):
            raise _fail(where, f"got {value!r}, a value listed twice; allowed: distinct values")
        return Param(name, choices=tuple(value))
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"low", "high", "log", "step"})
        if unknown or not {"low", "high"} <= set(value):
            raise _fail(where, f"got {value!r}; allowed keys: low, high (required), log, step")
        low, high, log, step = value["low"], value["high"], value.get("log", False), value.get("step")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)) \
                or low > high:
            raise _fail(where, f"got low={low!r}, high={high!r}; allowed: finite numbers with low <= high")
        if not isinstance(log, bool):
            raise _fail(f"{where}.log", f"got {log!r}; allowed: true, false")
        if log and low <= 0:
            raise _fail(where, f"got low={low!r} with log = true; allowed: low > 0")
        integer = spec is not None and spec.kind is int or spec is None and isinstance(low, int) and isinstance(high, int)
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, int if integer else int | float) or not step > 0:
                raise _fail(f"{where}.step", f"got {step!r}; allowed: {'an integer' if integer else 'a number'} > 0")
            if log:
                raise _fail(f"{where}.step", "given with log = true; allowed: one of the two")
        if spec is not None and spec.kind is float:  # a float knob's range samples floats, whatever its ends
            low, high = float(low), float(high)
        return Param(name, low=low, high=high, log=log, step=step)
    return None  # a scalar: fixed


def _space(method: str, table) -> MethodSpace:
    where = f"space.{method}"
    if not isinstance(table, dict):
        raise _fail(where, f"got {table!r}; allowed: a table of knobs")
    entry = get_method(method)
    entry.check_names(table, where, also=TRAIN_KNOBS)
    _refuse_study_settings(table, where)
    params, fixed = [], {}
    for name, value in table.items():
        spec = TRAIN_KNOB_SPECS.get(name) or entry.specs.get(name)
        param = _param(f"{where}.{name}", value, spec)
        if param is None:
            fixed[name] = value
        else:
            params.append(param)
        for v in [value] if param is None else param.choices or (param.low, param.high):
            if name in TRAIN_KNOBS:
                check_values({name: v}, TRAIN_KNOB_SPECS, where)
            else:
                entry.check_values({name: v}, where)  # each value against the method's own declaration
    # bounds first, so a constrained knob can be sampled within the sampled bound
    params.sort(key=lambda p: any(r.knob == p.name for r in entry.rules))
    space = MethodSpace(method, tuple(params), fixed, entry.rules,
                        {k: v for k, v in entry.knobs.items() if k not in STUDY_SETTINGS})
    for rule in entry.rules:
        _check_rule(space, rule, where)
    if entry.check is not None:  # e.g. PEFT builds its config: every value beside the fixed knobs
        own = {k: v for k, v in fixed.items() if k not in TRAIN_KNOBS}
        entry.check(own, where)
        for p in params:
            if p.name not in TRAIN_KNOBS:
                for v in p.choices or (p.low, p.high):
                    entry.check({**own, p.name: v}, where)
    return space


def _refuse_study_settings(knobs: dict, where: str) -> None:
    for name, setting in STUDY_SETTINGS.items():
        if name in knobs:
            raise _fail(f"{where}.{name}", f"set for every method by the study's {setting}, so it cannot also "
                        f"be set here; allowed: the method's other knobs")


def _range_of(space: MethodSpace, name: str) -> tuple[list, bool, bool] | None:
    """A knob's values as far as a rule is concerned (a range: its two ends), whether it is
    searched, and whether it is the method's default; None when it is not a number."""
    param = next((p for p in space.params if p.name == name), None)
    if param is not None:
        return (list(param.choices) if param.choices else [param.low, param.high]), True, False
    value = space.fixed.get(name, space.defaults.get(name))
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return [value], False, name not in space.fixed


def _check_rule(space: MethodSpace, rule: AtMost, where: str) -> None:
    """``knob <= bound`` for every combination the space can produce: when both are searched
    the sampler only pairs values that fit, so each knob value must fit some bound value;
    otherwise every value must fit."""
    knob, bound = _range_of(space, rule.knob), _range_of(space, rule.bound)
    if knob is None or bound is None:
        return
    (kv, k_searched, _), (bv, b_searched, b_default) = knob, bound
    default = ", its default" if b_default else ""
    if min(kv) > min(bv):
        if k_searched and b_searched:
            raise _fail(f"{where}.{rule.knob}", f"no value fits {rule.bound} = {min(bv)}; "
                        f"allowed: at least one value <= every {rule.bound}")
        if b_searched:
            raise _fail(f"{where}.{rule.bound}", f"got {min(bv)!r}; allowed: >= {rule.knob} "
                        f"({kv[0]!r}{', its default' if rule.knob not in space.fixed else ''}) for every value")
        raise _fail(f"{where}.{rule.knob}", f"got {min(kv)!r}; allowed: <= {rule.bound} ({bv[0]!r}{default})")
    if max(kv) > max(bv):
        largest = "the largest " if b_searched else ""
        raise _fail(f"{where}.{rule.knob}", f"got {max(kv)!r}, which no {rule.bound} allows; allowed: <= "
                    f"{largest}{rule.bound} ({max(bv)!r}{default})")


def _baseline(i: int, table) -> Baseline:
    where = f"baselines[{i}]"
    if not isinstance(table, dict) or "method" not in table:
        raise _fail(where, f"got {table!r}; allowed: a table with method (required), knobs, label")
    unknown = sorted(set(table) - {"method", "knobs", "label"})
    if unknown:
        raise _fail(f"{where}.{unknown[0]}", "unknown field; allowed: method, knobs, label")
    method, knobs = table["method"], table.get("knobs", {})
    if not isinstance(method, str):
        raise _fail(f"{where}.method", f"got {method!r}; allowed: a method name (qlsearch list methods)")
    if not isinstance(knobs, dict):
        raise _fail(f"{where}.knobs", f"got {knobs!r}; allowed: a table of knobs")
    try:
        entry = get_method(method)
    except ValueError as err:
        raise _fail(f"{where}.method", str(err).removeprefix("method: ")) from None
    where = f"{where}.knobs"
    entry.check_names(knobs, where, also=TRAIN_KNOBS)
    _refuse_study_settings(knobs, where)
    check_values({k: v for k, v in knobs.items() if k in TRAIN_KNOBS}, TRAIN_KNOB_SPECS, where)
    entry.check_knobs({k: v for k, v in knobs.items() if k not in TRAIN_KNOBS}, where)
    label = table.get("label", method)
    if "label" in table:
        check_name(label, f"baselines[{i}].label")
    return Baseline(method, dict(knobs), label)


def _drivers(table) -> Drivers:
    allowed = "integers heartbeat_seconds >= 1 and grace_seconds > heartbeat_seconds"
    if not isinstance(table, dict):
        raise _fail("drivers", f"got {table!r}; allowed: a table of {allowed}")
    _check_fields(Drivers, table, "drivers")
    drivers = Drivers(**table)
    seconds = (drivers.heartbeat_seconds, drivers.grace_seconds)
    if not (all(isinstance(v, int) and not isinstance(v, bool) for v in seconds)
            and 1 <= drivers.heartbeat_seconds < drivers.grace_seconds):
        raise _fail("drivers", f"got {table!r}; allowed: {allowed}")
    return drivers


def parse_study(data: dict, path: str | None = None) -> Study:
    """A validated ``Study`` from a parsed study file."""
    unknown = sorted(set(data) - _TOP_LEVEL)
    if unknown:
        raise _fail(f"study.{unknown[0]}", f"unknown field; allowed: {', '.join(sorted(_TOP_LEVEL))}")
    name = data.get("name")
    check_name(name, "study.name")
    check_text(data.get("description", ""), "study.description")
    task_table, train_table = _table(data, "task", "study.task"), _table(data, "train", "study.train")
    _check_types(TaskSpec, task_table, "task")
    _check_types(TrainSpec, train_table, "train")
    if "instruction" in task_table:
        check_text(task_table["instruction"], "task.instruction", empty=False)
    objectives = data.get("objectives")
    if not (isinstance(objectives, list) and objectives):
        raise _fail("study.objectives", f"got {objectives!r}; allowed: a non-empty list of metric names")
    metrics = []
    for i, objective in enumerate(objectives):
        if not isinstance(objective, str):
            raise _fail(f"objectives[{i}]", f"got {objective!r}; allowed: a metric name (qlsearch list metrics)")
        try:
            metrics.append(get_metric(objective))
        except ValueError as err:
            raise _fail(f"objectives[{i}]", str(err).removeprefix("objective: ")) from None
    if len({m.name for m in metrics}) != len(metrics):
        raise _fail("study.objectives", "a metric is listed twice")
    allow_test = data.get("allow_test_selection", False)
    if not isinstance(allow_test, bool):
        raise _fail("study.allow_test_selection", f"got {allow_test!r}; allowed: true, false")
    for i, m in enumerate(metrics):
        if m.selects_on_test and not allow_test:
            val = sorted(n for n, v in METRICS.items() if v.split == "val")
            raise _fail(f"objectives[{i}]", f"{m.name!r} is measured on the test set, which must never select; "
                        f"allowed: a validation metric ({', '.join(val)}) or any non-test metric, "
                        "or set allow_test_selection = true")
    space_table = _table(data, "space", "study.space")
    for method in space_table:
        try:
            get_method(method)
        except ValueError as err:
            raise _fail(f"space.{method}", str(err).removeprefix("method: ")) from None
    train = TrainSpec(**train_table)
    spaces = [_space(method, table) for method, table in space_table.items()]
    baseline_list = data.get("baselines", [])
    if not isinstance(baseline_list, list):
        raise _fail("study.baselines", f"got {baseline_list!r}; allowed: a list of tables ([[baselines]])")
    baselines = [_baseline(i, b) for i, b in enumerate(baseline_list)]
    labels = [b.label for b in baselines]
    if len(set(labels)) != len(labels):
        twice = next(x for x in labels if labels.count(x) > 1)
        raise _fail(f"baselines[{len(labels) - 1 - labels[::-1].index(twice)}].label",
                    f"{twice!r} names two baselines; allowed: a label per baseline (label = \"...\")")
    if not spaces and not baselines:
        raise _fail("study.space", "empty: name at least one method under [space.<method>] or a [[baselines]] entry")
    task = TaskSpec(**task_table)
    for method in dict.fromkeys([s.method for s in spaces] + [b.method for b in baselines]):
        check_targets(task, method)  # every method adapts the study's targets, or says so now
    seeds = data.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            and len(set(seeds)) == len(seeds)):
        raise _fail("study.seeds", f"got {seeds!r}; allowed: a non-empty list of distinct integers")
    per_method = data.get("trials_per_method")
    if per_method is not None:
        if "num_trials" in data:
            raise _fail("study.trials_per_method", "given with num_trials; allowed: one of the two")
        if not (isinstance(per_method, int) and not isinstance(per_method, bool) and per_method >= 1 and spaces):
            raise _fail("study.trials_per_method", f"got {per_method!r}; allowed: an integer >= 1, "
                        "with at least one [space.<method>]")
    num_trials = per_method * len(spaces) if per_method else data.get("num_trials", 8 if spaces else 0)
    if not (isinstance(num_trials, int) and not isinstance(num_trials, bool) and num_trials >= (1 if spaces else 0)):
        raise _fail("study.num_trials", f"got {num_trials!r}; allowed: an integer >= 1")
    resources_table = _table(data, "resources", "study.resources")
    _check_fields(Resources, resources_table, "resources")
    check_values(resources_table, RESOURCE_SPECS, "resources")
    resources = Resources(**resources_table)
    for key, spec in {"max_retries": Knob(int, low=0), "profile": Knob(bool), "cache_dir": Knob(str),
                      "storage": Knob(str)}.items():
        check_values({key: data[key]} if key in data else {}, {key: spec}, "study")
    timed = [m.name for m in metrics if m.name in LATENCY_METRICS]
    if timed and data.get("profile", True) is False:
        raise _fail("study.profile", f"false, but objective {timed[0]} is a latency, timed only when profiling; "
                    "allowed: profile = true, or objectives without forward_ms and forward_ratio")
    drivers = _drivers(data.get("drivers", {}))
    scheduler = data.get("scheduler", "none")
    if scheduler not in SCHEDULERS:
        raise _fail("study.scheduler", f"got {scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
    if scheduler == "asha" and metrics[0].name not in EARLY_STOPPABLE:
        raise _fail("study.scheduler", f"asha stops trials on the first objective, which must be "
                    f"measured while training; allowed first objectives: {', '.join(EARLY_STOPPABLE)}")
    sampler = data.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise _fail("study.sampler", f"got {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    ranges = [f"{s.method}.{p.name}" for s in spaces for p in s.params if p.choices is None]
    if sampler == "grid" and ranges:
        raise _fail("study.sampler", f"grid needs lists of values, but {ranges[0]} is a range; "
                    "allowed: list every value, or another sampler")
    retry = data.get("storage_retry_seconds", 60.0)
    if isinstance(retry, bool) or not (isinstance(retry, int | float) and 0 < retry < float("inf")):
        raise _fail("study.storage_retry_seconds", f"got {retry!r}; allowed: a number of seconds > 0")
    return Study(
        name=name,
        description=data.get("description", ""),
        task=task,
        train=train,
        objectives=metrics,
        spaces=spaces,
        baselines=baselines,
        seeds=seeds,
        num_trials=num_trials,
        resources=resources,
        drivers=drivers,
        scheduler=scheduler,
        sampler=sampler,
        storage=data.get("storage"),
        trials_per_method=per_method,
        allow_test_selection=allow_test,
        max_retries=data.get("max_retries", 0),
        profile=data.get("profile", True),
        cache_dir=data.get("cache_dir"),
        storage_retry_seconds=float(retry),
        path=path,
    )


def _merge(parent: dict, child: dict) -> dict:
    """``child`` over ``parent``: tables merge key by key, anything else is replaced."""
    merged = dict(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_study_file(path: str | Path, _seen: tuple = ()) -> dict:
    """The file's TOML, on top of the file it ``include``s (a path relative to it), recursively.

    A family of studies (one per function or task) then states only what differs.
    """
    from qlsearch._toml import read_toml

    path = Path(path)
    if path.resolve() in _seen:
        raise ValueError(f"study file {path}: include loops back to itself")
    data = read_toml(path, "study file")
    include = data.pop("include", None)
    if include is None:
        return data
    if not isinstance(include, str):
        raise ValueError(f"study file {path}: include: got {include!r}; allowed: a path to a study file")
    return _merge(read_study_file(path.parent / include, (*_seen, path.resolve())), data)


def load_study(path: str | Path) -> Study:
    """Parse and validate a study file; a bad file raises one ``ValueError`` naming the field."""
    return parse_study(read_study_file(path), str(path))


def study_files(path: str | Path) -> list[Path]:
    """A study file, or every study file of a folder (files starting with ``_`` are parents)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.toml") if not p.name.startswith("_"))
        if not files:
            raise ValueError(f"study folder: {path} holds no study file (*.toml)")
        return files
    return [path]

