"""MG401 eval-graph-unused: an eval forward built an autograd graph nobody used."""

from __future__ import annotations

from .._config import Severity
from ._base import Rule


class EvalGraphUnused(Rule):
    code = "MG401"
    name = "eval-graph-unused"
    severity = Severity.INFO
    summary = "an eval-mode forward ran with grad enabled and its autograd graph was freed without a backward."
    explanation = """
        Outside torch.no_grad() every forward keeps its activations alive for a backward
        pass. In evaluation that backward never comes, so the memory (and the time to record
        the graph) is wasted; on a GPU this is often what limits the evaluation batch size.
    """
    quiet_when = [
        "a backward does pass through the graph (adversarial examples, saliency maps, input gradients)",
        "the model is in train mode (that is MG201's business)",
    ]
    fix = "wrap evaluation in `with torch.no_grad():` (or torch.inference_mode())."

    def on_release(self, guard, record):
        if record.snapshot.root_training or record.where is None:
            return
        guard.emit(
            self, severity=None, root=record.root, where=record.where, modules=[],
            mode_site=record.root.root_site(),
            headline="an eval-mode forward built an autograd graph that no backward used",
            allowed=record.allowed,
        )
