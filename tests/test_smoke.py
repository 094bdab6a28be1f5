"""A first end-to-end check that the demo's bug is found (the full suite lives beside it)."""

import modeguard
from modeguard import _auto as auto
from modeguard.demo import train


def test_demo_loop_reports_step_in_eval():
    guard = auto.start(on_violation="record")
    try:
        train(epochs=2)
    finally:
        auto.stop()
    codes = {v.code for v in guard.violations}
    assert "MG101" in codes
    mg101 = next(v for v in guard.violations if v.code == "MG101")
    assert mg101.location.function == "train"
    assert mg101.mode_set_at.location.function == "validate"
    assert not modeguard.observe.modes.is_patched()
