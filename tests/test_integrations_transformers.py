"""modeguard.integrations.transformers, and modeguard with Hugging Face transformers and
accelerate (CPU, tiny models built from configs, a few steps each): the Trainer's own
mode handling is understood (its per-step ``model.train()`` is not reported, what it
undoes is), correct runs stay silent, ``generate()`` is one finding at the user's line,
and accelerate's wrapped optimizer can be watched.
"""

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import modeguard
from frameworks import (FRAMEWORK_WARNINGS, BackboneNet, BackboneNetKeepsEval, FeatureData, hf_trainer, line_of, loader, quiet_transformers,
                        tiny_bert, tiny_gpt2)
from modeguard import _auto as auto
from modeguard.integrations.transformers import ModeGuardCallback
from modeguard.observe import modes

pytestmark = [pytest.mark.usefixtures("isolated"), *FRAMEWORK_WARNINGS]

quiet_transformers()


def codes(report):
    return sorted(v.code for v in report)


def only(report, code):
    found = [v for v in report if v.code == code]
    assert len(found) == 1, str(report)
    return found[0]


def here_line(marker):
    return line_of(__import__(__name__), marker)


# ---- the Trainer callback -------------------------------------------------------------------


def test_the_callback_is_a_trainer_callback():
    from transformers import TrainerCallback

    cb = ModeGuardCallback()
    assert isinstance(cb, TrainerCallback) and cb.guard is None
    with pytest.raises(ValueError, match="fail_on"):
        ModeGuardCallback(fail_on="sometimes")


@pytest.mark.parametrize("eval_strategy", ["no", "steps"])
def test_a_correct_trainer_run_is_silent(tmp_path, eval_strategy, capsys):
    cb = ModeGuardCallback(fail_on="info")
    model = tiny_bert()
    trainer = hf_trainer(model, tmp_path, [cb], eval_strategy=eval_strategy, eval_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", modeguard.ModeGuardWarning)
        trainer.train()
    assert codes(cb.report) == []
    assert "modeguard: no train/eval mode problems found." in capsys.readouterr().out
    assert cb.guard is None and not modes.is_patched()


def test_a_frozen_batchnorm_backbone_the_trainer_puts_back_in_train_is_mg301(tmp_path):
    model = BackboneNet()
    model.backbone.requires_grad_(False)
    model.backbone.eval()  # undone by the Trainer's model.train() at every step
    cb = ModeGuardCallback(fail_on="never", print_report=False)
    hf_trainer(model, tmp_path, [cb], data=FeatureData()).train()  # TRAIN
    v = only(cb.report, "MG301")
    assert v.modules == ["backbone.1"]
    site = v.mode_set_at
    assert site.framework == "Trainer.training_step (transformers)" and site.how == "BackboneNet.train()"
    assert (site.location.file, site.location.line) == (__file__, here_line("# TRAIN"))  # the user's train() call
    assert "by Trainer.training_step (transformers)" in v.message
    assert "Trainer.training_step: train()" in str(cb.report).splitlines()[2]


def test_a_train_override_that_keeps_the_backbone_in_eval_is_silent(tmp_path):
    model = BackboneNetKeepsEval()
    model.backbone.requires_grad_(False)
    cb = ModeGuardCallback(fail_on="info", print_report=False)
    hf_trainer(model, tmp_path, [cb], data=FeatureData()).train()
    assert codes(cb.report) == []


def test_fail_on_stops_the_trainer_before_the_first_update(tmp_path):
    model = BackboneNet()
    model.backbone.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    cb = ModeGuardCallback(fail_on="warning", print_report=False)
    with pytest.raises(modeguard.FrozenBNDriftError, match="modeguard stopped training"):
        hf_trainer(model, tmp_path, [cb], data=FeatureData()).train()
    assert torch.equal(before["head.weight"], model.state_dict()["head.weight"])
    assert cb.guard is None and not modes.is_patched() and codes(cb.report) == ["MG301"]


def test_watch_in_a_users_trainer_callback_takes_the_accelerated_optimizer(tmp_path):
    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            assert type(optimizer).__name__ == "AcceleratedOptimizer"
            self.guard = modeguard.watch(model, optimizer, on_violation="record")
            assert self.guard.optimizer_state(optimizer.optimizer) is not None

        def on_train_end(self, args, state, control, **kwargs):
            self.report = self.guard.report()
            self.guard.unwatch()

    w = Watch()
    hf_trainer(tiny_bert(), tmp_path, [w]).train()
    assert codes(w.report) == []


# ---- generate() -------------------------------------------------------------------------------


def _prompt():
    return torch.randint(2, 100, (2, 4), generator=torch.Generator().manual_seed(0))


def test_generate_after_eval_is_silent():
    model = tiny_gpt2()
    with modeguard.watch(model, on_violation="record") as guard:
        model.eval()
        model.generate(_prompt(), max_new_tokens=5, do_sample=False)
        assert codes(guard.report()) == []


def test_generate_right_after_training_in_train_mode_is_one_mg201_at_the_users_call(tmp_path):
    model = tiny_gpt2()
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(2, 100, (8, 6))]
    hf_trainer(model, tmp_path, data=data, max_steps=2).train()
    assert model.training  # as the Trainer leaves it
    with modeguard.watch(model, on_violation="record") as guard:
        model.generate(_prompt(), max_new_tokens=5, do_sample=False)  # GENERATE
        report = guard.report()
    v = only(report, "MG201")  # one call, one row
    assert len(report) == 1
    assert (v.location.file, v.location.line) == (__file__, here_line("# GENERATE"))
    assert "transformer.h.{0,1}.attn.attn_dropout" in v.message
    assert not any(name.endswith(".attn") or name == "transformer" for name in v.modules)  # leaves only
    assert "BatchNorm" not in v.why


def test_generate_under_automatic_watching_is_one_finding_named_by_the_models_class():
    model = tiny_gpt2()
    guard = auto.start(on_violation="record")
    try:
        model.generate(_prompt(), max_new_tokens=5, do_sample=False)  # AUTO-GENERATE
    finally:
        auto.stop()
    report = guard.report()
    assert [(v.code, v.model, v.location.line) for v in report] == [
        ("MG201", "GPT2LMHeadModel", here_line("# AUTO-GENERATE"))]


# ---- accelerate -------------------------------------------------------------------------------


def test_an_accelerate_loop_whose_evaluate_never_calls_train_is_mg101_at_its_step():
    from accelerate import Accelerator

    from models import MLP

    accelerator = Accelerator(cpu=True)
    net = MLP()
    model, opt, data = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1), loader())
    assert type(opt).__name__ == "AcceleratedOptimizer"

    def evaluate():
        model.eval()  # EVALUATE
        with torch.no_grad():
            return sum(F.cross_entropy(model(x), y).item() for x, y in data)

    with modeguard.watch(model, opt, on_violation="record") as guard:
        model.train()
        for epoch in range(2):
            for x, y in data:
                accelerator.backward(F.cross_entropy(model(x), y))
                opt.step()  # ACCELERATE-STEP
                opt.zero_grad()
            evaluate()
        report = guard.report()
    v = only(report, "MG101")
    assert v.count == 6  # the whole second epoch
    assert (v.location.file, v.location.line) == (__file__, here_line("# ACCELERATE-STEP"))
    assert (v.mode_set_at.location.line, v.mode_set_at.framework) == (here_line("# EVALUATE"), None)
    assert codes(report) == ["MG101"]


# ---- the README's sample ----------------------------------------------------------------------


def test_the_readme_transformers_report_is_what_the_example_prints(capsys, monkeypatch):
    import runpy

    from test_golden import ROOT, check, check_readme

    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join("tests", "scripts", "hf_example.py"), run_name="__main__")
    out = capsys.readouterr().out
    report = out[out.index("modeguard report"):]
    check("hf_report.txt", report)
    check_readme("hf-report", "hf_report.txt")
