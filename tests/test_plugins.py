"""Any PEFT method as ``peft:<name>``, user plug-ins (``module:attribute`` and entry points), one
registry story: through real PEFT, real trials and real Ray sweeps.

The plug-in tests run the README's own code blocks, so the README's example stays true.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import optuna
import peft
import pytest
from peft.config import PromptLearningConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from transformers import AutoModelForCausalLM

from qlsearch._registry import Registry
from qlsearch._toml import tomllib
from qlsearch.adapters import Method, attach, get_method
from qlsearch.backbones import SYNTHETIC_TARGETS, build_backbone
from qlsearch.study import parse_study
from qlsearch.trial import TrialConfig
from tests.conftest import tiny_qwen2
from tests.test_cli import run

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_files() -> dict[str, str]:
    """The README's code blocks that start by naming a file (``# my_plugins.py``): name -> text."""
    blocks = re.findall(r"```(?:python|toml)\n# (\S+\.(?:py|toml))\n(.*?)```", README.read_text(), re.S)
    return dict(blocks)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture
def fresh_ray(monkeypatch):
    """A sweep that starts its own Ray: the workers see this test's environment (and only it)."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.shutdown()
    yield
    ray.shutdown()


@pytest.fixture
def clean_imports(monkeypatch):
    """``sys.path`` and ``my_plugins`` restored after the test (the CLI appends the cwd)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_plugins", raising=False)
    yield
    sys.modules.pop("my_plugins", None)


def completed_trials(root: Path, name: str) -> list:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{root / name / 'study.db'}")
    trials = study.get_trials()
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), \
        [t.user_attrs.get("failure") for t in trials]
    return trials


# ---- peft:<name> ---------------------------------------------------------------------------


def test_every_peft_method_that_adapts_linears_is_named():
    runnable = {str(t.value).lower() for t, c in PEFT_TYPE_TO_CONFIG_MAPPING.items()
                if not issubclass(c, PromptLearningConfig)} - {"adalora", "xlora", "trainable_tokens",
                                                               "adaption_prompt"}
    for name in ("loha", "lokr", "ia3", "oft", "boft", "vera", "fourierft"):
        assert name in runnable
    for name in runnable:
        method = get_method(f"peft:{name}")
        assert method.name == f"peft:{name}"
        method.check_knobs(method.knobs)  # PEFT's own defaults pass the type checks


def test_peft_knobs_are_the_config_fields_with_their_defaults():
    knobs = get_method("peft:loha").knobs
    config = peft.LoHaConfig()
    assert {"r", "alpha", "rank_dropout", "module_dropout", "target_modules"} <= set(knobs)
    assert not {"task_type", "peft_type", "inference_mode"} & set(knobs)  # every config has them
    for name in ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d"):
        assert knobs[name] == getattr(config, name)


def test_peft_method_adapts_what_peft_itself_adapts():
    ours = attach(tiny_qwen2(), "peft:loha", r=4, alpha=8)
    theirs = peft.get_peft_model(tiny_qwen2(), peft.LoHaConfig(r=4, alpha=8, target_modules="all-linear"))
    assert trainable(ours) == trainable(theirs) > 0
    ia3 = attach(tiny_qwen2(), "peft:ia3", target_modules=["q_proj", "v_proj"], feedforward_modules=[])
    # IA3: one scaling vector per adapted output (q: 32, v: 16 wide) in each of 4 layers
    assert trainable(ia3) == 4 * (32 + 16)


@pytest.mark.parametrize(
    ("name", "message"),
    [("peft:lohaa", r"^method: unknown PEFT [\d.]+\S* method 'peft:lohaa'; allowed: .*peft:lokr.*"
                    r"Did you mean 'peft:loha'\?$"),
     ("peft:prompt_tuning", r"^method: peft:prompt_tuning is a prompt-learning method"),
     ("peft:adalora", r"^method: peft:adalora cannot run here: AdaLoRA reallocates its rank budget"),
     ("lorra", r"^method: unknown adapter 'lorra'; allowed: dora, .*lora.*peft:<name>.*Did you mean 'lora'\?$"),
     ("no_such_module:THING", r"^method: cannot import 'no_such_module'")],
)
def test_bad_method_names_get_one_clear_error(name, message):
    with pytest.raises(ValueError, match=message):
        get_method(name)


def test_bad_peft_knob_fails_study_validation_in_one_line_naming_it():
    def study(knobs):
        return {"name": "s", "objectives": ["val_mse"],
                "task": {"kind": "synthetic", "name": "sin_cos", "backbone": "mlp"},
                "baselines": [{"method": "peft:loha"}, {"method": "peft:lokr", "knobs": knobs}]}

    cases = [({"alpah": 4}, r"^baselines\[1\]\.knobs\.alpah: not a knob of peft:lokr; allowed: .*"
                            r"Did you mean 'alpha'\?$"),
             ({"r": "eight"}, r"^baselines\[1\]\.knobs\.r: got 'eight'; allowed: int \(LoKrConfig\.r, default 8\)$"),
             ({"layers_to_transform": "x"}, r"^baselines\[1\]\.knobs\.layers_to_transform: got 'x'; allowed: "
                                            r"int \| list\[int\] \| None"),
             # the study's task.targets go to every method: a method's own targets are refused
             ({"target_modules": 3}, r"^baselines\[1\]\.knobs\.target_modules: set for every method by the "
                                     r"study's task\.targets")]
    for knobs, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            parse_study(study(knobs))
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^space\.peft:loha\.r: got 'x'; allowed: int"):
        parse_study({**study({}), "space": {"peft:loha": {"r": [2, "x"]}}})
    with pytest.raises(ValueError, match=r"^knobs\.alpah: not a knob of peft:loha"):
        TrialConfig(method="peft:loha", knobs={"alpah": 2})


PEFT_STUDY = """
name = "peft-any"
objectives = ["val_mse", "trainable_params"]
cache_dir = "{cache}"

[task]
kind = "synthetic"
name = "sin_cos"
backbone = "mlp"

[train]
epochs = 2
pretrain_epochs = 1
batch_size = 200

[[baselines]]
method = "peft:loha"
knobs = {{r = 2}}

[[baselines]]
method = "peft:lokr"
knobs = {{r = 2}}

[[baselines]]
method = "peft:vera"
knobs = {{r = 4}}

[resources]
max_concurrent = 2
"""


def test_sweep_of_three_peft_methods(tmp_path, fresh_ray, capsys):
    path = tmp_path / "peft.toml"
    path.write_text(PEFT_STUDY.format(cache=tmp_path / "cache"))
    code, _, err = run(capsys, "sweep", str(path), "--root", str(tmp_path / "runs"), "--num-cpus", "2", "--quiet")
    assert code == 0, err
    trials = completed_trials(tmp_path / "runs", "peft-any")
    by_method = {t.user_attrs["method"]: t for t in trials}
    assert set(by_method) == {"peft:loha", "peft:lokr", "peft:vera"}
    targets = SYNTHETIC_TARGETS["mlp"]  # the same targets every method gets
    for method, config in (("peft:loha", peft.LoHaConfig(r=2, target_modules=targets)),
                           ("peft:lokr", peft.LoKrConfig(r=2, target_modules=targets)),
                           ("peft:vera", peft.VeraConfig(r=4, target_modules=targets))):
        expected = trainable(peft.get_peft_model(build_backbone("mlp"), config))
        assert by_method[method].values[1] == expected, method


def test_params_takes_peft_methods(tmp_path, capsys):
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100).save_pretrained(tmp_path)
    code, out, err = run(capsys, "params", "--model", str(tmp_path), "--r", "4", "--methods",
                         "peft:loha,peft:lokr", "--json")
    assert code == 0, err
    rows = {row["method"]: row for row in json.loads(out)}
    assert rows["peft:loha"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] and rows["peft:loha"]["trainable"] > 0


def test_profile_takes_peft_methods(tmp_path, capsys):
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2).save_pretrained(tmp_path)
    code, out, err = run(capsys, "profile", "--model", str(tmp_path), "--methods", "peft:loha", "--batch", "1",
                         "--seq", "4", "--repeats", "1", "--warmup", "0", "--threads", "1",
                         "--skip", "decode,train,flops", "--r", "4", "--json")
    assert code == 0, err
    row = json.loads(out)["methods"]["peft:loha"]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = AutoModelForCausalLM.from_config(Qwen2Config.from_pretrained(tmp_path))
    assert row["trainable_params"] == trainable(peft.get_peft_model(model, peft.LoHaConfig(r=4, target_modules=targets)))
    assert row["forward_ms"] > 0


# ---- qlsearch list -------------------------------------------------------------------------


def test_list_methods_shows_builtins_and_peft_methods(capsys):
    code, out, _ = run(capsys, "list", "methods")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "built-in" in lines["lora"] and "built-in" in lines["queryable"] and "num_atoms=16" in lines["queryable"]
    for name in ("loha", "lokr", "ia3", "oft", "vera"):
        assert "PEFT" in lines[f"peft:{name}"]
    assert "r=8" in lines["peft:loha"]
    code, out, _ = run(capsys, "list", "functions", "--json")
    assert {row["name"] for row in json.loads(out)} >= {"ackley", "sin_cos"}
    for kind, name in (("tasks", "arc_easy"), ("metrics", "best_test_mse")):
        code, out, _ = run(capsys, "list", kind)
        assert code == 0 and name in out


def test_every_kind_answers_a_miss_the_same_way():
    from qlsearch.metrics import get_metric
    from qlsearch.tasks.synthetic import get_function
    from qlsearch.tasks.text import get_text_task

    cases = [(get_method, "lorra", "method: unknown adapter 'lorra'", "lora"),
             (get_function, "ackly", "function: unknown function 'ackly'", "ackley"),
             (get_text_task, "arc_eazy", "task: unknown text task 'arc_eazy'", "arc_easy"),
             (get_metric, "best_test_mes", "objective: unknown metric 'best_test_mes'", "best_test_mse")]
    for get, name, start, close in cases:
        with pytest.raises(ValueError) as err:
            get(name)
        message = str(err.value)
        assert message.startswith(start + "; allowed: ") and message.endswith(f"Did you mean {close!r}?")
    registry = Registry("thing", "field", "qlsearch.no-such-group", Method)
    with pytest.raises(ValueError, match=r"^field: 'json:dumps' is a function; allowed: a "):
        registry.get("json:dumps")


def test_references_name_the_same_kind_of_object_for_every_kind(tmp_path, monkeypatch):
    from qlsearch.metrics import get_metric
    from qlsearch.tasks.synthetic import get_function
    from qlsearch.tasks.text import get_text_task

    (tmp_path / "my_kinds.py").write_text(
        "from qlsearch.adapters import get_method\n"
        "from qlsearch.metrics import get_metric\n"
        "from qlsearch.tasks.synthetic import FUNCTIONS\n"
        "from qlsearch.tasks.text import get_text_task\n"
        "FUNCTION = FUNCTIONS['matyas']\nTASK = get_text_task('boolq')\nMETHOD = get_method('lora')\n"
        "METRIC = get_metric('forward_ms')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_kinds", raising=False)
    assert get_function("my_kinds:FUNCTION") is get_function("matyas")
    assert get_text_task("my_kinds:TASK") is get_text_task("boolq")
    assert get_method("my_kinds:METHOD") is get_method("lora")
    with pytest.raises(ValueError, match=r"^objective: unknown metric 'my_kinds:METRIC'; allowed: .*an entry point"):
        get_metric("my_kinds:METRIC")  # a record keeps a metric under its name: no references
    with pytest.raises(ValueError, match=r"^task: 'my_kinds:METHOD' is a Method; allowed: a qlsearch.tasks.text.TextTask$"):
        get_text_task("my_kinds:METHOD")
    with pytest.raises(ValueError, match=r"^function: module 'my_kinds' has no attribute 'NOPE'"):
        get_function("my_kinds:NOPE")


# ---- the README's plug-ins -------------------------------------------------------------------


def offsets_params() -> int:
    """The toy method's trainable parameters: one offset per output of each adapted linear."""
    targets = SYNTHETIC_TARGETS["mlp"]
    return sum(m.out_features for n, m in build_backbone("mlp").named_modules()
               if n.rsplit(".", 1)[-1] in targets)


def test_readme_plugins_by_reference_run_as_a_trial_and_a_sweep(tmp_path, monkeypatch, fresh_ray,
                                                                  clean_imports, capsys):
    files = readme_files()
    project = tmp_path / "project"
    project.mkdir()
    for name in ("my_plugins.py", "trial.toml", "study.toml"):
        (project / name).write_text(files[name])
    monkeypatch.chdir(project)  # the README's way: run from the folder holding my_plugins.py
    code, out, err = run(capsys, "trial", "trial.toml", "--out", str(tmp_path / "trial.json"))
    assert code == 0, err
    record = json.loads((tmp_path / "trial.json").read_text())
    assert record["config"]["task"]["name"] == "my_plugins:GRIEWANK"
    assert record["profile"]["trainable_params"] == offsets_params()

    # The sweep starts elsewhere, with the module importable in this process only (not from the
    # workers' folder, not on PYTHONPATH): the workers can import it only if the sweep ships it.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.syspath_prepend(str(project))
    assert str(project) not in os.environ.get("PYTHONPATH", "")
    code, out, err = run(capsys, "sweep", str(project / "study.toml"), "--num-cpus", "2", "--quiet")
    assert code == 0, err
    trials = completed_trials(elsewhere / "runs", "plugins")
    assert sorted(t.user_attrs["knobs"]["scale"] for t in trials) == [0.5, 1.0]
    assert all(t.values[1] == offsets_params() for t in trials)


def write_installed_package(site: Path, module: str, pyproject: dict) -> None:
    """What ``pip install --target site`` leaves for a one-module package: the module and its
    ``.dist-info`` (METADATA, entry_points.txt, top_level.txt, RECORD)."""
    project = pyproject["project"]
    (site / "my_plugins.py").write_text(module)
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project["entry-points"]
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items()) + "\n"
        for group, points in groups.items()))
    (info / "top_level.txt").write_text("my_plugins\n")
    (info / "RECORD").write_text("")


def test_readme_plugins_as_entry_points_run_as_a_trial_and_a_sweep(tmp_path, monkeypatch, fresh_ray,
                                                                     clean_imports, capsys):
    files = readme_files()
    site = tmp_path / "site"
    site.mkdir()
    write_installed_package(site, files["my_plugins.py"], tomllib.loads(files["pyproject.toml"]))
    # installed for this process and, through the environment Ray starts with, for its workers
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.chdir(tmp_path)

    code, out, _ = run(capsys, "list", "methods")
    line = next(line for line in out.splitlines() if line.startswith("offsets "))
    assert "entry point (qlsearch-my-plugins 0.1.0)" in line and "scale=1.0" in line
    code, out, _ = run(capsys, "list", "functions")
    assert any(line.startswith("griewank ") and "entry point" in line for line in out.splitlines())

    trial = files["trial.toml"].replace("my_plugins:OFFSETS", "offsets").replace("my_plugins:GRIEWANK", "griewank")
    (tmp_path / "trial.toml").write_text(trial)
    code, out, err = run(capsys, "trial", "trial.toml", "--out", str(tmp_path / "trial.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "trial.json").read_text())["profile"]["trainable_params"] == offsets_params()

    (tmp_path / "study-installed.toml").write_text(files["study-installed.toml"])
    code, out, err = run(capsys, "sweep", "study-installed.toml", "--num-cpus", "2", "--quiet")
    assert code == 0, err
    trials = completed_trials(tmp_path / "runs", "plugins-installed")
    assert sorted(t.user_attrs["knobs"]["scale"] for t in trials) == [0.5, 1.0]
