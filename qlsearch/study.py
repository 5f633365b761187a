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
the sampler shares out between methods as it likes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from qlsearch.adapters import get_method
from qlsearch.metrics import METRICS, Metric, get_metric
from qlsearch.trial import TaskSpec, TrainSpec, _check_fields, check_targets

#: ``knob <= bound`` pairs: combinations that break them are never sampled (paper B.2: k <= M).
CONSTRAINTS = {"top_k": ("num_atoms", "num_experts")}
SCHEDULERS = ("none", "asha")
#: How configurations are chosen. "tpe" (the default), "random" and "nsgaii" are Optuna's
#: samplers (TPE and NSGA-II handle several objectives; TPE also conditional spaces);
#: "grid" enumerates a space of lists (k <= M filtered), in a seeded random order, so a
#: small space is covered without running one configuration twice.
SAMPLERS = ("tpe", "random", "nsgaii", "grid")
#: Objectives known during training (ASHA can only stop trials on one of these).
EARLY_STOPPABLE = ("val_mse", "val_loss", "best_test_mse", "final_test_mse", "best_test_loss", "final_test_loss")
#: Training settings a space (or a baseline) may set per method, beside the method's own knobs.
TRAIN_KNOBS = ("lr", "weight_decay")


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


@dataclass(frozen=True)
class MethodSpace:
    method: str
    params: tuple[Param, ...]
    fixed: dict

    def bound_of(self, param: Param) -> str | None:
        """The knob that bounds ``param`` in this space (``num_atoms`` for ``top_k``), if any."""
        names = {p.name for p in self.params} | set(self.fixed)
        return next((b for b in CONSTRAINTS.get(param.name, ()) if b in names), None)


@dataclass(frozen=True)
class Baseline:
    """A method at fixed settings, run on every seed and enqueued into the same study."""

    method: str
    knobs: dict
    label: str


@dataclass(frozen=True)
class Resources:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # fractional GPUs share one device; ignored where Ray sees no GPU
    max_concurrent: int = 1


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
    scheduler: str = "none"
    sampler: str = "tpe"
    storage: str | None = None  # None: sqlite file under the run folder
    trials_per_method: int | None = None  # None: num_trials is one budget for all searched methods
    allow_test_selection: bool = False  # a test metric may be an objective (the report says so)
    #: re-runs of a trial whose worker or node died, afresh on a node with room (a trial's own
    #: failure is final); past them it ends failed with the reason ("node died: ...")
    max_retries: int = 0
    profile: bool = True
    description: str = ""
    cache_dir: str = "runs/cache"
    path: str | None = None

    def grid(self) -> list[tuple[str, dict]]:
        """Every ``(method, knobs)`` of the spaces (lists only), ``k <= M`` enforced."""
        import itertools

        points = []
        for space in self.spaces:
            names = [p.name for p in space.params]
            for values in itertools.product(*(p.choices for p in space.params)):
                knobs = {**space.fixed, **dict(zip(names, values, strict=True))}
                if all(knobs[p.name] <= knobs[b] for p in space.params if (b := space.bound_of(p))):
                    points.append((space.method, knobs))
        return points

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
        return Path(root) / self.name

    def storage_url(self, root: str | Path = "runs") -> str:
        return self.storage or f"sqlite:///{(self.run_dir(root) / 'study.db').resolve()}"


_TOP_LEVEL = {"name", "description", "task", "train", "objectives", "space", "baselines", "seeds",
              "num_trials", "trials_per_method", "resources", "scheduler", "sampler", "storage", "max_retries",
              "profile", "cache_dir", "allow_test_selection"}


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"{where}: {message}")


def _param(method: str, name: str, value) -> Param | None:
    where = f"space.{method}.{name}"
    if isinstance(value, list):
        if not value:
            raise _fail(where, "an empty list; allowed: a non-empty list of values, a {low, high} range or a scalar")
        return Param(name, choices=tuple(value))
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"low", "high", "log", "step"})
        if unknown or not {"low", "high"} <= set(value):
            raise _fail(where, f"got {value!r}; allowed keys: low, high (required), log, step")
        low, high = value["low"], value["high"]
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in (low, high)) or low > high:
            raise _fail(where, f"got low={low!r}, high={high!r}; allowed: finite numbers with low <= high")
        if value.get("log") and low <= 0:
            raise _fail(where, f"got low={low!r} with log = true; allowed: low > 0")
        return Param(name, low=low, high=high, log=bool(value.get("log", False)), step=value.get("step"))
    return None  # a scalar: fixed


def _space(method: str, table) -> MethodSpace:
    if not isinstance(table, dict):
        raise _fail(f"space.{method}", f"got {table!r}; allowed: a table of knobs")
    entry = get_method(method)
    entry.check_names(table, f"space.{method}", also=TRAIN_KNOBS)
    params, fixed = [], {}
    for name, value in table.items():
        param = _param(method, name, value)
        if param is None:
            fixed[name] = value
        else:
            params.append(param)
        if name in TRAIN_KNOBS:  # a training setting, checked as a TrainSpec field
            continue
        for v in [value] if param is None else param.choices or (param.low, param.high):
            entry.check_knobs({name: v}, f"space.{method}")  # each value of the knob's type
    # bounds first, so a constrained knob can be sampled within the sampled bound
    params.sort(key=lambda p: p.name in CONSTRAINTS)
    space = MethodSpace(method, tuple(params), fixed)
    for p in params:
        bound = space.bound_of(p)
        if bound is None:
            continue
        lowest = min(_values(space, bound))
        if (min(p.choices) if p.choices else p.low) > lowest:
            raise _fail(f"space.{method}.{p.name}", f"no value fits {bound} = {lowest}; "
                        f"allowed: at least one value <= every {bound}")
    for name, value in fixed.items():
        bound = next((b for b in CONSTRAINTS.get(name, ()) if b in fixed), None)
        if bound and value > fixed[bound]:
            raise _fail(f"space.{method}.{name}", f"got {value!r}; allowed: <= {bound} ({fixed[bound]})")
    return space


def _values(space: MethodSpace, name: str) -> list:
    if name in space.fixed:
        return [space.fixed[name]]
    p = next(p for p in space.params if p.name == name)
    return list(p.choices) if p.choices else [p.low, p.high]


def _baseline(i: int, table) -> Baseline:
    where = f"baselines[{i}]"
    if not isinstance(table, dict) or "method" not in table:
        raise _fail(where, f"got {table!r}; allowed: a table with method (required), knobs, label")
    unknown = sorted(set(table) - {"method", "knobs", "label"})
    if unknown:
        raise _fail(f"{where}.{unknown[0]}", "unknown field; allowed: method, knobs, label")
    method, knobs = table["method"], dict(table.get("knobs", {}))
    try:
        entry = get_method(method)
    except ValueError as err:
        raise _fail(f"{where}.method", str(err).removeprefix("method: ")) from None
    entry.check_names(knobs, f"{where}.knobs", also=TRAIN_KNOBS)
    entry.check_knobs({k: v for k, v in knobs.items() if k not in TRAIN_KNOBS}, f"{where}.knobs")
    return Baseline(method, knobs, table.get("label") or method)


def parse_study(data: dict, path: str | None = None) -> Study:
    """A validated ``Study`` from a parsed study file."""
    unknown = sorted(set(data) - _TOP_LEVEL)
    if unknown:
        raise _fail(f"study.{unknown[0]}", f"unknown field; allowed: {', '.join(sorted(_TOP_LEVEL))}")
    name = data.get("name")
    if not (isinstance(name, str) and name and all(c.isalnum() or c in "-_." for c in name)):
        raise _fail("study.name", f"got {name!r}; allowed: a non-empty name of letters, digits, '-', '_', '.'")
    _check_fields(TaskSpec, data.get("task", {}), "task")
    _check_fields(TrainSpec, data.get("train", {}), "train")
    objectives = data.get("objectives")
    if not (isinstance(objectives, list) and objectives):
        raise _fail("study.objectives", f"got {objectives!r}; allowed: a non-empty list of metric names")
    metrics = []
    for i, objective in enumerate(objectives):
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
    space_table = data.get("space", {})
    for method in space_table:
        try:
            get_method(method)
        except ValueError as err:
            raise _fail(f"space.{method}", str(err).removeprefix("method: ")) from None
    spaces = [_space(method, table) for method, table in space_table.items()]
    baselines = [_baseline(i, b) for i, b in enumerate(data.get("baselines", []))]
    if not spaces and not baselines:
        raise _fail("study.space", "empty: name at least one method under [space.<method>] or a [[baselines]] entry")
    task = TaskSpec(**data.get("task", {}))
    for method in dict.fromkeys([s.method for s in spaces] + [b.method for b in baselines]):
        check_targets(task, method)  # every method adapts the study's targets, or says so now
    seeds = data.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)):
        raise _fail("study.seeds", f"got {seeds!r}; allowed: a non-empty list of integers")
    per_method = data.get("trials_per_method")
    if per_method is not None:
        if "num_trials" in data:
            raise _fail("study.trials_per_method", "given with num_trials; allowed: one of the two")
        if not (isinstance(per_method, int) and per_method >= 1 and spaces):
            raise _fail("study.trials_per_method", f"got {per_method!r}; allowed: an integer >= 1, "
                        "with at least one [space.<method>]")
    num_trials = per_method * len(spaces) if per_method else data.get("num_trials", 8 if spaces else 0)
    if not (isinstance(num_trials, int) and num_trials >= (1 if spaces else 0)):
        raise _fail("study.num_trials", f"got {num_trials!r}; allowed: an integer >= 1")
    resources_table = data.get("resources", {})
    _check_fields(Resources, resources_table, "resources")
    resources = Resources(**resources_table)
    if not (resources.cpus_per_trial > 0 and resources.gpus_per_trial >= 0 and resources.max_concurrent >= 1):
        raise _fail("resources", f"got {resources_table!r}; allowed: cpus_per_trial > 0, "
                    "gpus_per_trial >= 0, max_concurrent >= 1")
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
    max_retries = data.get("max_retries", 0)  # Tune's FailureConfig(max_failures=...)
    if not (isinstance(max_retries, int) and not isinstance(max_retries, bool) and max_retries >= 0):
        raise _fail("study.max_retries", f"got {max_retries!r}; allowed: an integer >= 0 (how often a "
                    "trial whose worker or node died runs again before it ends failed)")
    return Study(
        name=name,
        description=data.get("description", ""),
        task=task,
        train=TrainSpec(**data.get("train", {})),
        objectives=metrics,
        spaces=spaces,
        baselines=baselines,
        seeds=seeds,
        num_trials=num_trials,
        resources=resources,
        scheduler=scheduler,
        sampler=sampler,
        storage=data.get("storage"),
        trials_per_method=per_method,
        allow_test_selection=allow_test,
        max_retries=max_retries,
        profile=bool(data.get("profile", True)),
        cache_dir=data.get("cache_dir", "runs/cache"),
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
    from qlsearch._toml import tomllib

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"study file: {path} does not exist")
    if path.resolve() in _seen:
        raise ValueError(f"study file {path}: include loops back to itself")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"study file {path}: not valid TOML ({err})") from None
    include = data.pop("include", None)
    if include is None:
        return data
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

