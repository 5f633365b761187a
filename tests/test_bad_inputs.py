"""Bad study files, the way people write them: each one is caught before anything runs.

Every case writes a file, runs the real command (``qlsearch.cli.main``, what the console
script runs), and checks the exit status (2), the first error line (the field's TOML
path and the allowed values), that nothing was written under the root or the working
folder, that Ray was never started, and that the healthy study already in the root
(created the way ``qlsearch sweep`` creates it) keeps a byte-identical SQLite file.
Most cases run as ``sweep --resume`` under that study's name: the worst place for a
bad file to slip through, as it would add failed trials to a good study.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from qlsearch.cli import main

NAME = '"healthy"'
TOP = ""
TASK = 'kind = "synthetic"\nname = "sin_cos"\nbackbone = "mlp"'
TRAIN = "epochs = 1\npretrain_epochs = 1"
SPACE = '[space.queryable]\nr = [2, 4]\nnum_atoms = 4\ntop_k = [1, 2]\nd_k = 8'
BASELINES = '[[baselines]]\nmethod = "lora"\nknobs = {r = 2}'
STUDY = """name = {name}
seeds = [0]
num_trials = 2
objectives = ["val_mse", "trainable_params"]
{top}

[task]
{task}

[train]
{train}

{space}

{baselines}
"""


# (id, the file's parts that differ from the healthy study, the expected error after "error: <file>: ")
CASES = [
    # ---- schema: the file and its tables -----------------------------------------------------
    ("duplicate-key", {"top": "num_trials = 3"}, r"study file \S+: duplicate key 'num_trials' \(line 5\)"),
    ("duplicate-table", {"train": "epochs = 1\n[train]\nlr = 1e-3"}, r"duplicate key 'train'"),
    ("bom-then-bad-value", {"space": "[space.queryable]\nr = 0", "bom": True},
     r"space\.queryable\.r: got 0; allowed: an integer >= 1$"),
    ("objective-as-table", {"top": 'objectives = [{name = "val_mse"}]', "drop_objectives": True},
     r"objectives\[0\]: got \{'name': 'val_mse'\}; allowed: a metric name"),
    ("task-not-a-table", {"top": 'task = "sin_cos"', "task": None},
     r"study\.task: got 'sin_cos'; allowed: a table"),
    ("space-not-a-table", {"top": "space = [1, 2]", "space": ""}, r"study\.space: got \[1, 2\]; allowed: a table"),
    ("baselines-not-a-list", {"baselines": '[baselines]\nmethod = "lora"'},
     r"study\.baselines: got \{'method': 'lora'\}; allowed: a list of tables"),
    ("unknown-top-field", {"top": "epochs = 3"}, r"study\.epochs: unknown field; allowed: .*train"),
    ("seeds-twice", {"top": "seeds = [0, 0]", "drop_seeds": True}, r"study\.seeds: got \[0, 0\]; allowed: a non-empty list of distinct integers"),
    ("seed-a-string", {"top": 'seeds = ["0"]', "drop_seeds": True}, r"study\.seeds: got \['0'\]"),
    ("num-trials-bool", {"top": "num_trials = true", "drop_trials": True}, r"study\.num_trials: got True; allowed: an integer >= 1"),
    ("num-trials-string", {"top": 'num_trials = "8"', "drop_trials": True}, r"study\.num_trials: got '8'"),
    ("cpus-a-string", {"top": '[resources]\ncpus_per_trial = "2"'},
     r"resources\.cpus_per_trial: got '2'; allowed: a finite number > 0"),
    ("max-concurrent-zero", {"top": "[resources]\nmax_concurrent = 0"},
     r"resources\.max_concurrent: got 0; allowed: an integer >= 1"),
    ("cpu-fallback-a-string", {"top": '[resources]\ncpu_fallback = "yes"'},
     r"resources\.cpu_fallback: got 'yes'; allowed: true or false"),
    ("max-retries-negative", {"top": "max_retries = -1"}, r"study\.max_retries: got -1; allowed: an integer >= 0"),
    ("latency-without-profile", {"top": 'profile = false\nobjectives = ["val_mse", "forward_ratio"]', "drop_objectives": True},
     r"study\.profile: false, but objective forward_ratio is a latency, timed only when profiling; allowed: "),
    ("profile-a-string", {"top": 'profile = "yes"'}, r"study\.profile: got 'yes'; allowed: true or false"),
    ("epochs-a-float", {"train": "epochs = 2.5"}, r"train\.epochs: got 2\.5; allowed: int"),
    ("limit-a-string", {"task": TASK + '\nlimit_train = "10"'}, r"task\.limit_train: got '10'; allowed: int \| None"),
    ("include-missing", {"top": 'include = "_nowhere.toml"'}, r"study file: \S+_nowhere\.toml does not exist"),
    ("include-a-number", {"top": "include = 3"}, r"include: got 3; allowed: a path to a study file"),
    # ---- knob values: types, bounds, k <= M, through the adapters' own declarations ------------
    ("r-zero", {"space": "[space.queryable]\nr = 0"}, r"space\.queryable\.r: got 0; allowed: an integer >= 1$"),
    ("r-a-string", {"space": '[space.queryable]\nr = "8"'}, r"space\.queryable\.r: got '8'; allowed: an integer >= 1$"),
    ("r-a-float", {"space": "[space.queryable]\nr = 8.0"}, r"space\.queryable\.r: got 8\.0; allowed: an integer >= 1$"),
    ("r-in-a-list", {"space": '[space.queryable]\nr = [4, "8"]'}, r"space\.queryable\.r: got '8'; allowed: an integer"),
    ("list-value-twice", {"space": "[space.queryable]\nr = [4, 4]"}, r"space\.queryable\.r: got \[4, 4\], a value listed twice"),
    ("tau-lang-negative", {"space": "[space.queryable]\ntau_lang = -1"},
     r"space\.queryable\.tau_lang: got -1; allowed: a finite number >= 0$"),
    ("dropout-one", {"space": "[space.queryable]\ndropout = [0.0, 1.0]"},
     r"space\.queryable\.dropout: got 1\.0; allowed: a finite number in \[0, 1\)$"),
    ("range-end-out-of-bounds", {"space": "[space.queryable]\ndropout = {low = 0.0, high = 1.5}"},
     r"space\.queryable\.dropout: got 1\.5; allowed: a finite number in \[0, 1\)"),
    ("top-k-above-fixed-m", {"space": "[space.queryable]\nnum_atoms = 4\ntop_k = 8"},
     r"space\.queryable\.top_k: got 8; allowed: <= num_atoms \(4\)$"),
    ("default-k-above-listed-m", {"space": "[space.queryable]\nnum_atoms = [2, 8]"},
     r"space\.queryable\.num_atoms: got 2; allowed: >= top_k \(4, its default\) for every value"),
    ("fixed-k-above-m-range", {"space": "[space.queryable]\ntop_k = 4\nnum_atoms = {low = 2, high = 8}"},
     r"space\.queryable\.num_atoms: got 2; allowed: >= top_k \(4\) for every value"),
    ("listed-k-above-default-m", {"space": "[space.queryable]\ntop_k = [1, 32]"},
     r"space\.queryable\.top_k: got 32, which no num_atoms allows; allowed: <= num_atoms \(16, its default\)"),
    ("listed-k-above-every-m", {"space": "[space.queryable]\ntop_k = [1, 16]\nnum_atoms = [4, 8]"},
     r"space\.queryable\.top_k: got 16, which no num_atoms allows; allowed: <= the largest num_atoms \(8\)"),
    ("step-zero", {"space": "[space.queryable]\nr = {low = 2, high = 8, step = 0}"},
     r"space\.queryable\.r\.step: got 0; allowed: an integer > 0"),
    ("step-a-float-on-an-int-knob", {"space": "[space.queryable]\nr = {low = 2, high = 8, step = 0.5}"},
     r"space\.queryable\.r\.step: got 0\.5; allowed: an integer > 0"),
    ("step-with-log", {"space": "[space.queryable]\nlr = {low = 1e-4, high = 1e-2, log = true, step = 1e-4}"},
     r"space\.queryable\.lr\.step: given with log = true; allowed: one of the two"),
    ("range-on-a-choice-knob", {"space": "[space.replora]\nactivation = {low = 1, high = 2}"},
     r"space\.replora\.activation: got 1; allowed: one of 'gelu', 'relu', 'silu', 'tanh', 'identity'"),
    ("lr-zero-in-a-space", {"space": "[space.queryable]\nlr = {low = 0, high = 1e-2}"},
     r"space\.queryable\.lr: got 0\.0; allowed: a finite number > 0"),
    ("train-lr-zero", {"train": TRAIN + "\nlr = 0"}, r"train\.lr: got 0; allowed: a finite number > 0"),
    ("weight-decay-negative", {"train": TRAIN + "\nweight_decay = -0.1"},
     r"train\.weight_decay: got -0\.1; allowed: a finite number >= 0"),
    ("baseline-r-zero", {"baselines": '[[baselines]]\nmethod = "lora"\nknobs = {r = 0}'},
     r"baselines\[0\]\.knobs\.r: got 0; allowed: an integer >= 1$"),
    ("baseline-k-above-default-experts", {"baselines": '[[baselines]]\nmethod = "moelora"\nknobs = {top_k = 8}'},
     r"baselines\[0\]\.knobs\.top_k: got 8; allowed: <= num_experts \(4, its default\)"),
    ("baseline-k-above-its-m", {"baselines": '[[baselines]]\nmethod = "queryable"\nknobs = {num_atoms = 2, top_k = 3}'},
     r"baselines\[0\]\.knobs\.top_k: got 3; allowed: <= num_atoms \(2\)$"),
    ("baseline-weight-decay", {"baselines": '[[baselines]]\nmethod = "lora"\nknobs = {weight_decay = -1}'},
     r"baselines\[0\]\.knobs\.weight_decay: got -1; allowed: a finite number >= 0"),
    ("peft-knob-type", {"baselines": '[[baselines]]\nmethod = "peft:loha"\nknobs = {r = "8"}'},
     r"baselines\[0\]\.knobs\.r: got '8'; allowed: int \(LoHaConfig\.r, default 8\)"),
    ("peft-refuses-it", {"baselines": '[[baselines]]\nmethod = "lily"\nknobs = {num_B = 1}'},
     r"baselines\[0\]\.knobs\.num_B: got 1; allowed: an integer >= 2"),
    ("vblora-k-above-bank", {"space": "[space.vblora]\nnum_vectors = 8\ntopk = [2, 16]"},
     r"space\.vblora\.topk: got 16, which no num_vectors allows; allowed: <= num_vectors \(8\)"),
    ("targets-searched", {"space": '[space.lora]\ntarget_modules = [["0"], ["2"]]'},
     r"space\.lora\.target_modules: set for every method by the study's task\.targets"),
    ("seed-as-a-knob", {"baselines": '[[baselines]]\nmethod = "hyra"\nknobs = {seed = 3}'},
     r"baselines\[0\]\.knobs\.seed: set for every method by the study's seeds"),
    # ---- names --------------------------------------------------------------------------------
    ("name-dot-dot", {"name": '".."'}, r"study\.name: got '\.\.'; allowed: a name of letters, digits, '-' and '_'"),
    ("name-dot", {"name": '"."'}, r"study\.name: got '\.'"),
    ("name-a-path", {"name": '"runs/../x"'}, r"study\.name: got 'runs/\.\./x'"),
    ("name-with-a-dot", {"name": '"my.study"'}, r"study\.name: got 'my\.study'"),
    ("name-a-number", {"name": "7"}, r"study\.name: got 7"),
    ("label-escapes", {"baselines": '[[baselines]]\nmethod = "lora"\nlabel = "../lora"'},
     r"baselines\[0\]\.label: got '\.\./lora'; allowed: a name of letters"),
    ("labels-twice", {"baselines": BASELINES + "\n" + BASELINES},
     r"baselines\[1\]\.label: 'lora' names two baselines"),
    # ---- budgets ------------------------------------------------------------------------------
    ("per-method-zero", {"top": "trials_per_method = 0", "drop_trials": True},
     r"study\.trials_per_method: got 0; allowed: an integer >= 1"),
    ("per-method-and-total", {"top": "trials_per_method = 2"}, r"study\.trials_per_method: given with num_trials"),
    ("budget-negative", {"top": "num_trials = -1", "drop_trials": True}, r"study\.num_trials: got -1"),
    # ---- text ---------------------------------------------------------------------------------
    ("description-control-char", {"top": 'description = "quick\\u0007"'},
     r"study\.description: holds the control character '\\x07'; allowed: printable text"),
    ("instruction-empty", {"task": TASK + '\ninstruction = "  "'},
     r"task\.instruction: got '  '; allowed: a non-empty string"),
    ("instruction-escape-sequence", {"task": TASK + '\ninstruction = "\\u001b[31mSolve"'},
     r"task\.instruction: holds the control character '\\x1b'"),
]


def write_study(folder: Path, case_id: str, parts: dict) -> Path:
    parts = dict(parts)
    bom = parts.pop("bom", False)
    template = STUDY
    for key, line in (("drop_objectives", "objectives = "), ("drop_seeds", "seeds = "),
                      ("drop_trials", "num_trials = ")):
        if parts.pop(key, False):  # the case sets it itself
            template = "\n".join(x for x in template.splitlines() if not x.startswith(line)) + "\n"
    if "task" in parts and parts["task"] is None:  # the case gives the task another way
        template, parts["task"] = template.replace("[task]\n{task}\n", ""), ""
    defaults = {"name": NAME, "top": TOP, "task": TASK, "train": TRAIN, "space": SPACE, "baselines": BASELINES}
    path = folder / f"{case_id}.toml"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + template.format(**{**defaults, **parts}).encode())
    return path


def tree(*folders: Path) -> dict[str, str]:
    """Every file under ``folders`` and its sha256: what a command must leave as it found it."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """A healthy study, created as ``qlsearch sweep`` creates it (storage, baselines queued)."""
    from qlsearch.search import open_study, prepare
    from qlsearch.study import load_study

    home = tmp_path_factory.mktemp("bad-inputs")
    root = home / "runs"
    study = load_study(write_study(home, "healthy", {}))
    ot_study, _ = open_study(study, root)
    assert prepare(ot_study, study) == 3  # the lora baseline and the two searched trials
    return home, root


@pytest.fixture
def no_ray(monkeypatch):
    """Any start of Ray or of a Tune run fails the case."""
    import ray
    from ray import tune

    def started(*args, **kwargs):
        raise AssertionError("Ray was started for a study that does not validate")

    monkeypatch.setattr(ray, "init", started)
    monkeypatch.setattr(tune, "Tuner", started)


def run_command(capsys, argv: list[str]) -> tuple[int, list[str]]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if "error: " in line]


def check_refused(capsys, home: Path, root: Path, argv: list[str], expected: str, path: Path) -> None:
    before = tree(home)
    code, errors = run_command(capsys, argv)
    assert code == 2 and errors, errors
    first = errors[0].split("error: ", 1)[1]
    assert first.startswith(f"{path}: "), first
    assert re.search(expected, first), first
    assert tree(home) == before  # nothing written, the healthy study.db byte-identical
    assert not (Path.cwd() / "runs").exists() and not (Path.cwd() / "reports").exists()


@pytest.mark.parametrize(("case_id", "parts", "expected"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_study_is_refused_before_anything_runs(healthy, tmp_path, monkeypatch, capsys, no_ray,
                                                     case_id, parts, expected):
    home, root = healthy
    monkeypatch.chdir(tmp_path)
    path = write_study(tmp_path, case_id, parts)
    assert (root / "healthy" / "study.db").is_file()
    check_refused(capsys, home, root, ["sweep", str(path), "--resume", "--root", str(root)], expected, path)


@pytest.mark.parametrize("command", ["status", "report", "sweep"])
def test_every_command_validates_first(healthy, tmp_path, monkeypatch, capsys, no_ray, command):
    home, root = healthy
    monkeypatch.chdir(tmp_path)
    path = write_study(tmp_path, "k-above-m", {"space": "[space.queryable]\nnum_atoms = 4\ntop_k = 8"})
    check_refused(capsys, home, root, [command, str(path), "--root", str(root)],
                  r"space\.queryable\.top_k: got 8; allowed: <= num_atoms \(4\)$", path)


def test_a_bad_trial_file_is_refused_before_it_runs(healthy, tmp_path, monkeypatch, capsys):
    home, root = healthy
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "trial.toml"
    path.write_bytes(b'\xef\xbb\xbfmethod = "queryable"\nknobs = {r = 0}\n[task]\nname = "sin_cos"\n')
    check_refused(capsys, home, root, ["trial", str(path)], r"knobs\.r: got 0; allowed: an integer >= 1$", path)


def test_a_name_that_would_leave_the_root_is_refused_by_status(healthy, tmp_path, monkeypatch, capsys):
    home, root = healthy
    monkeypatch.chdir(tmp_path)
    before = tree(home)
    code, errors = run_command(capsys, ["status", "../healthy", "--root", str(root / "healthy")])
    assert code == 2 and re.search(r"error: study: got '\.\./healthy'; allowed: a name of letters", errors[0]), errors
    assert tree(home) == before


def test_a_bad_value_in_an_included_file_is_named(healthy, tmp_path, monkeypatch, capsys, no_ray):
    home, root = healthy
    monkeypatch.chdir(tmp_path)
    write_study(tmp_path, "_parent", {"space": "[space.queryable]\nr = [2, 4]\ntop_k = 1\ntau_lang = -0.5"})
    child = tmp_path / "child.toml"
    child.write_text('include = "_parent.toml"\n[space.queryable]\nr = 4\n')
    check_refused(capsys, home, root, ["sweep", str(child), "--resume", "--root", str(root)],
                  r"space\.queryable\.tau_lang: got -0\.5; allowed: a finite number >= 0$", child)


def test_a_byte_order_mark_is_accepted(tmp_path):
    from qlsearch.study import load_study

    path = write_study(tmp_path, "bom", {"bom": True})
    assert load_study(path).name == "healthy"
