"""The multi-task synthetic task: instructions that name each member, its trial path, its studies."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qlsearch.tasks.multitask import MULTITASKS, Member, MultiTask, make_multitask_splits
from qlsearch.tasks.synthetic import target_values
from qlsearch.trial import TaskSpec, TrainSpec, TrialConfig, _apply_instruction_mode, run_trial

STUDIES = Path(__file__).parents[1] / "studies"


def test_instruction_names_the_function_and_the_shift_in_words():
    assert Member("levy", 0.5, 0).instruction == "Fit the Levy surface shifted right by 0.5."
    assert Member("levy", 0, -0.25).instruction == "Fit the Levy surface shifted down by 0.25."
    assert Member("styblinski_tang", -1, 0.5).instruction == \
        "Fit the Styblinski-Tang surface shifted left by 1 and up by 0.5."
    assert Member("rastrigin").instruction == "Fit the Rastrigin surface, not shifted."


def test_shifted_right_moves_the_surface_towards_positive_x1():
    u = torch.rand(50, 2, dtype=torch.float64) - 0.5
    moved = Member("ackley", dx=0.5).values(u + torch.tensor([0.5, 0.0], dtype=torch.float64), seed=3)
    assert torch.allclose(moved, target_values("ackley", u, 3))


def test_members_disagree_on_the_same_inputs_so_only_the_instruction_tells_them_apart():
    u = 2 * torch.rand(400, 2, dtype=torch.float64) - 1
    values = torch.stack([m.values(u, 0) for m in MULTITASKS["levy-shifts"].members])
    # the spread between members at one x is far above the label noise (std 0.05)
    assert values.std(0).mean() > 10 * 0.05


def test_splits_are_per_member_deterministic_and_disjoint():
    splits = make_multitask_splits("levy-shifts", seed=1, train_n=30, val_n=10, test_n=20)
    x, y, ids = splits.train
    assert x.shape == (120, 2) and y.shape == (120, 1) and ids.tolist() == [i for i in range(4) for _ in range(30)]
    assert splits.val[0].shape == (40, 2) and splits.test[0].shape == (80, 2)
    assert torch.equal(y, make_multitask_splits("levy-shifts", seed=1, train_n=30, val_n=10, test_n=20).train[1])
    assert not torch.equal(x[:30], splits.val[0][:30].repeat(3, 1)[:30])
    assert not torch.equal(y, make_multitask_splits("levy-shifts", seed=2, train_n=30, val_n=10, test_n=20).train[1])
    assert splits.instructions[ids[0]] == "Fit the Levy surface shifted right by 0.5."


def test_bad_multitasks_are_named():
    with pytest.raises(ValueError, match=r"task\.name: unknown multi-task 'levy-shift'.*levy-shifts"):
        TaskSpec(kind="multitask", name="levy-shift", backbone="mlp")
    with pytest.raises(ValueError, match="members: two members have the same instruction"):
        MultiTask("levy", (Member("levy"), Member("levy")))
    with pytest.raises(ValueError, match="unknown function 'levi'"):
        MultiTask("levi", (Member("levy"), Member("ackley")))


def test_adversarial_gives_every_example_another_tasks_instruction():
    texts = ["a b", "c d", "e f"]
    rows = {"train": [SimpleNamespace(instruction=texts[i % 3]) for i in range(60)]}
    before = [r.instruction for r in rows["train"]]
    _apply_instruction_mode(TaskSpec(kind="multitask", name="levy-shifts", backbone="mlp",
                                     instruction_mode="adversarial"), rows, None, seed=0)
    after = [r.instruction for r in rows["train"]]
    assert all(a != b and a in texts for a, b in zip(after, before, strict=True))
    assert len(set(after)) == 3  # drawn per example, not one fixed swap
    one = {"train": [SimpleNamespace(instruction="only one")]}
    with pytest.raises(ValueError, match="'adversarial' needs two or more distinct instructions"):
        _apply_instruction_mode(TaskSpec(instruction_mode="adversarial"), one, None, seed=0)


@pytest.mark.parametrize("method", ["instr-queryable", "lora"])
def test_a_multitask_trial_records_every_members_test_mse(tmp_path, method):
    knobs = {"r": 2, "num_atoms": 4, "top_k": 2, "num_blocks": 2, "d_k": 8} if method != "lora" else {"r": 2}
    config = TrialConfig(method=method, knobs=knobs, seed=0, profile=False, cache_dir=str(tmp_path),
                         task=TaskSpec(kind="multitask", name="levy-shifts", backbone="mlp"),
                         train=TrainSpec(epochs=2, pretrain_epochs=1))
    record = run_trial(config)
    assert record["status"] == "completed", record.get("traceback")
    per_task = record["metrics"]["test_mse_per_task"]
    assert list(per_task) == ["levy-x+0.5", "levy-x-0.5", "levy-y+0.5", "levy-y-0.5"]
    # members have equal test sizes: the overall MSE is the mean of the members'
    assert sum(per_task.values()) / 4 == pytest.approx(record["metrics"]["test_mse"], rel=1e-4)
    if method == "instr-queryable":
        assert all(abs(sum(block) - 1) < 1e-5 for block in record["metrics"]["atom_usage"])


def test_the_shipped_multitask_studies_validate_as_qlsearch_sweep_does(tmp_path):
    """What `qlsearch sweep` does before starting Ray: parse every file and open its study."""
    from qlsearch.search import open_study
    from qlsearch.study import load_study, study_files

    full = load_study(STUDIES / "multitask-full-space.toml")
    knobs = {p.name for p in full.spaces[0].params} | set(full.spaces[0].fixed)
    assert full.spaces[0].method == "instr-queryable"
    assert {"r", "num_atoms", "top_k", "num_blocks", "tau_lang", "lambda_ctx"} <= knobs
    assert {"queryable", "lora", "dora"} <= {s.method for s in full.spaces} and full.trials_per_method
    arms = [load_study(p) for p in study_files(STUDIES / "multitask-ablation")]
    assert len(arms) == 7 and len({(a.task.instruction_mode, a.task.instruction) for a in arms}) == 6
    assert len({tuple(sorted(a.baselines[0].knobs.items())) for a in arms}) == 2  # state-only: tau_lang 0
    for study in [full, *arms]:
        ot_study, _ = open_study(study, tmp_path)
        assert not ot_study.trials
