"""modeguard.integrations.lightning, and modeguard under real PyTorch Lightning training
(CPU, a few steps each): correct programs stay silent, the usual bugs are found with the
right code and the user's own line, findings do not lag behind Lightning's
``optimizer.step(closure)``, and ``fail_on`` / ``on_violation="raise"`` stop the first bad
update.

The LightningModules here call ``self(x)`` in their training_step, except where a test
says ``submodules=True``: then the model's own forward never runs, and what its
gradients show is checked at the step.
"""

import copy
import os
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn

import modeguard
from frameworks import FRAMEWORK_WARNINGS, LitMLP, fit, line_of, loader
from modeguard.integrations.lightning import ModeGuardCallback
from modeguard.observe import modes

pytestmark = [pytest.mark.usefixtures("isolated"), *FRAMEWORK_WARNINGS]

FRAMEWORKS_FILE = os.path.join(os.path.dirname(__file__), "frameworks.py")


def codes(report):
    return sorted(v.code for v in report)


def only(report, code):
    found = [v for v in report if v.code == code]
    assert len(found) == 1, str(report)
    return found[0]


# ---- the callback ---------------------------------------------------------------------------


def test_the_callback_is_a_lightning_callback_and_checks_its_options():
    cb = ModeGuardCallback()
    assert isinstance(cb, pl.Callback)
    assert cb.guard is None and cb.report is None
    with pytest.raises(ValueError, match="MG999"):
        ModeGuardCallback(rules={"MG999": "off"})
    with pytest.raises(ValueError, match="fail_on"):
        ModeGuardCallback(fail_on="sometimes")


def test_a_correct_run_with_validation_is_silent_and_prints_that(capsys):
    cb = ModeGuardCallback()
    module = LitMLP()
    fit(module, [cb], val_every=2)
    assert len(cb.report) == 0
    assert "modeguard: no train/eval mode problems found." in capsys.readouterr().out
    assert cb.guard is None and not modes.is_patched()  # unwatched at the end of fit
    assert module.training and module.drop.training  # Lightning's restore, untouched


def test_the_report_goes_to_the_trainers_loggers():
    class Recorder(pl.loggers.Logger):
        name, version = "rec", 0
        def __init__(self):
            super().__init__()
            self.metrics = []
        @property
        def experiment(self):
            return None
        def log_metrics(self, metrics, step=None):
            self.metrics.append(dict(metrics))
        def log_hyperparams(self, *args, **kwargs):
            pass

    class LeaveEval(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            pl_module.eval()

    rec = Recorder()
    cb = ModeGuardCallback(fail_on="never", print_report=False)
    fit(LitMLP(), [cb, LeaveEval()], logger=rec)
    assert {"modeguard/error": 1, "modeguard/warning": 0, "modeguard/info": 0} in rec.metrics


# ---- correct programs, silent ----------------------------------------------------------------


class FrozenBackbone(pl.Callback):
    """The usual fine-tuning: the frozen BatchNorm backbone in eval at each epoch."""

    def on_train_epoch_start(self, trainer, pl_module):
        pl_module.backbone.eval()


class Distill(LitMLP):
    """A teacher frozen in __init__ (eval, no gradients), run under no_grad each step."""

    def __init__(self):
        super().__init__()
        self.teacher = copy.deepcopy(self.backbone).eval().requires_grad_(False)

    def forward(self, x):
        with torch.no_grad():
            target = self.teacher(x)
        return self.head(self.drop(self.backbone(x) + 0 * target))

    def configure_optimizers(self):
        return torch.optim.SGD([p for n, p in self.named_parameters() if not n.startswith("teacher")], lr=0.1)


class Finetune(LitMLP):
    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


@pytest.mark.parametrize("case", ["frozen-backbone", "teacher", "backbone-finetuning", "manual"])
def test_correct_lightning_programs_are_silent(case):
    cb = ModeGuardCallback(fail_on="info")
    callbacks = [cb]
    steps = 6
    if case == "frozen-backbone":
        module = LitMLP(freeze_backbone=True)
        callbacks.append(FrozenBackbone())
    elif case == "teacher":
        module = Distill()
    elif case == "backbone-finetuning":
        from pytorch_lightning.callbacks import BackboneFinetuning

        module = Finetune()
        callbacks.append(BackboneFinetuning(unfreeze_backbone_at_epoch=1, verbose=False))
        steps = 12  # two epochs of six batches: frozen, then unfrozen into a new param group
    else:
        module = LitMLP(manual=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", modeguard.ModeGuardWarning)
        fit(module, callbacks, val_every=3, max_steps=steps)
    assert codes(cb.report) == []


# ---- bugs, found at the user's line ----------------------------------------------------------


class EncoderLeftInEval(pl.Callback):
    """A callback that puts the encoder in eval (for a look at its features) and forgets
    to put it back."""

    def on_train_epoch_start(self, trainer, pl_module):
        pl_module.backbone.eval()  # LEFT-IN-EVAL


def test_a_callback_that_leaves_the_encoder_in_eval_is_mg101():
    cb = ModeGuardCallback(fail_on="never", print_report=False)
    fit(LitMLP(), [cb, EncoderLeftInEval()], val_every=3)
    v = only(cb.report, "MG101")
    assert v.modules == ["backbone.1"] and v.count == 6  # every step, none lagging
    # The step runs inside Lightning; the forward whose gradients it applies was called
    # from the user's training_step: that line, not the fit() call.
    assert (v.location.file, v.location.line, v.location.function) == (
        FRAMEWORKS_FILE, line_of(LitMLP.training_step, "# FORWARD"), "training_step")
    site = v.mode_set_at
    assert (site.location.file, site.location.line) == (__file__, line_of(EncoderLeftInEval, "# LEFT-IN-EVAL"))
    assert site.how == "Sequential.eval()" and site.framework is None


def test_a_training_step_that_calls_submodules_is_checked_too():
    # training_step calls self.backbone, self.drop and self.head, never self(x): the
    # LightningModule's own forward does not run, its gradients still tell.
    cb = ModeGuardCallback(fail_on="never", print_report=False)
    fit(LitMLP(submodules=True), [cb, EncoderLeftInEval()], val_every=3)
    v = only(cb.report, "MG101")
    assert v.modules == ["backbone.1"] and v.count == 6
    # No forward of the LightningModule ran, so no line called it: the finding names the
    # user's training_step (its def line), not the fit() call.
    assert (v.location.file, v.location.line, v.location.function) == (
        FRAMEWORKS_FILE, LitMLP.training_step.__code__.co_firstlineno, "training_step")
    site = v.mode_set_at
    assert (site.location.file, site.location.line) == (__file__, line_of(EncoderLeftInEval, "# LEFT-IN-EVAL"))


def test_a_correct_training_step_that_calls_submodules_is_silent():
    cb = ModeGuardCallback(fail_on="never", print_report=False)
    fit(LitMLP(submodules=True), [cb], val_every=3)
    assert list(cb.report) == []


def test_a_whole_model_left_in_eval_is_an_error_at_the_users_training_step():
    class Eval(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            pl_module.eval()

    cb = ModeGuardCallback(fail_on="never", print_report=False)
    fit(LitMLP(), [cb, Eval()])
    v = only(cb.report, "MG101")
    assert v.count == 6 and v.severity is modeguard.Severity.ERROR
    assert (v.location.file, v.location.line, v.location.function) == (
        FRAMEWORKS_FILE, line_of(LitMLP.training_step, "# FORWARD"), "training_step")
    assert "site-packages" not in str(v)


def test_manual_optimization_that_skips_manual_backward_is_mg602_at_its_step():
    cb = ModeGuardCallback(fail_on="never", print_report=False)
    fit(LitMLP(manual=True, skip_backward=True), [cb])
    v = only(cb.report, "MG602")
    assert (v.location.file, v.location.line) == (FRAMEWORKS_FILE, line_of(LitMLP.training_step, "# MANUAL-STEP"))
    assert v.count >= 5  # every step after the first (whose stale gradients are none)


def test_a_frozen_batchnorm_backbone_left_in_train_is_mg301_and_lightnings_restore_is_not_blamed():
    cb = ModeGuardCallback(fail_on="never", print_report=False)
    fit(LitMLP(freeze_backbone=True), [cb], val_every=2)  # validation: eval(), then the restore
    v = only(cb.report, "MG301")
    assert v.modules == ["backbone.1"]
    # Never put in eval by the user: no "mode set at", and never Lightning's restore.
    assert v.mode_set_at is None, v.mode_set_at
    assert "model_helpers" not in str(cb.report) and "restore" not in str(cb.report)


class FromPretrained(pl.LightningModule):
    """A Hugging Face model loaded with from_pretrained (which returns it in eval) and
    trained under Lightning, which never calls train()."""

    def __init__(self, path):
        super().__init__()
        from transformers import BertForSequenceClassification

        self.model = BertForSequenceClassification.from_pretrained(path)

    def forward(self, ids):
        return self.model(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return torch.nn.functional.cross_entropy(self(ids), y)  # HF-FORWARD

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    from frameworks import quiet_transformers, tiny_bert

    quiet_transformers()
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert().save_pretrained(path)
    return path


def test_a_from_pretrained_model_that_stays_in_eval_under_lightning_is_mg101(pretrained_dir):
    module = FromPretrained(pretrained_dir)
    assert not module.model.training  # as from_pretrained returns it
    ids = torch.randint(2, 100, (16, 8), generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, torch.randint(0, 2, (16,))), batch_size=4)
    cb = ModeGuardCallback(fail_on="never", print_report=False)
    trainer = pl.Trainer(max_steps=3, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0,
                         callbacks=[cb])
    trainer.fit(module, data)
    v = only(cb.report, "MG101")
    assert v.count == 3 and v.severity is modeguard.Severity.ERROR and v.model == "FromPretrained"
    # The leaves that change behaviour, not the containers, and repeated layers once.
    assert "model.bert.encoder.layer.0" not in v.modules and "model.bert" not in v.modules
    text = str(cb.report)
    assert "model.bert.encoder.layer.{0,1}.attention.self.dropout" in text
    assert "BatchNorm" not in v.why and "Dropout was switched off" in v.why


# ---- findings do not lag, and stop the first bad update --------------------------------------


class EvalFromTheStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        pl_module.eval()


@pytest.mark.parametrize("manual", [False, True])
def test_fail_on_stops_the_first_bad_update(manual):
    module = LitMLP(manual=manual)
    before = copy.deepcopy(module.state_dict())
    cb = ModeGuardCallback(fail_on="error", print_report=False)
    with pytest.raises(modeguard.StepInEvalError, match="modeguard stopped training") as exc:
        fit(module, [cb, EvalFromTheStart()])
    assert exc.value.violation.count == 1
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # not one parameter moved
    assert cb.guard is None and not modes.is_patched() and len(cb.report) == 1


@pytest.mark.parametrize("manual", [False, True])
def test_watch_with_raise_in_a_users_callback_stops_the_first_bad_update(manual):
    class Watch(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.guard = modeguard.watch(pl_module, *trainer.optimizers, on_violation="raise")

        def on_exception(self, trainer, pl_module, exception):
            self.guard.unwatch()

    module = LitMLP(manual=manual)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(modeguard.StepInEvalError):
        fit(module, [Watch(), EvalFromTheStart()])
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_findings_count_every_step_under_closures():
    cb = ModeGuardCallback(fail_on="never", print_report=False)
    fit(LitMLP(), [cb, EvalFromTheStart()], max_steps=9)
    assert only(cb.report, "MG101").count == 9  # not one behind


def test_watching_lightnings_optimizer_wrapper():
    class Watch(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            wrapped = pl_module.optimizers()  # a LightningOptimizer
            assert not type(wrapped).__name__.startswith("SGD")
            self.guard = modeguard.watch(pl_module, wrapped, on_violation="record")
            assert self.guard.optimizer_state(trainer.optimizers[0]) is not None

        def on_train_end(self, trainer, pl_module):
            self.report = self.guard.report()
            self.guard.unwatch()

    w = Watch()
    fit(LitMLP(manual=True, skip_backward=True), [w])
    assert codes(w.report) == ["MG602"]


def test_under_modeguard_run_the_callback_leaves_the_automatic_guard_alone():
    from modeguard import _auto as auto

    guard = auto.start(on_violation="record")
    try:
        cb = ModeGuardCallback(fail_on="never", print_report=False)
        fit(LitMLP(), [cb, EvalFromTheStart()])
        assert auto.active() and guard.active
        assert codes(cb.report) == ["MG101"]
    finally:
        auto.stop()
    assert [v.code for v in guard.violations] == ["MG101"]  # one finding, not two


def test_under_modeguard_run_a_submodule_called_by_training_step_is_found_at_that_line():
    from modeguard import _auto as auto

    guard = auto.start(on_violation="record")
    try:
        fit(LitMLP(submodules=True), [EncoderLeftInEval()], val_every=3)
    finally:
        auto.stop()
    v = only(guard.violations, "MG101")
    # the backbone, called from training_step, is a model of its own there
    assert v.model == "LitMLP.backbone" and v.modules == ["1"]
    assert (v.location.file, v.location.line, v.location.function) == (
        FRAMEWORKS_FILE, line_of(LitMLP.training_step, "# FORWARD"), "training_step")


# ---- the README's sample ----------------------------------------------------------------------


def test_the_readme_lightning_report_is_what_the_example_prints(capsys, monkeypatch):
    import runpy

    from test_golden import ROOT, check, check_readme

    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join("tests", "scripts", "lightning_example.py"), run_name="__main__")
    out = capsys.readouterr().out
    report = out[out.index("modeguard report"):]
    check("lightning_report.txt", report)
    check_readme("lightning-report", "lightning_report.txt")
