"""modeguard.observe.graph: the grad_fn nodes of a forward's outputs, however nested; a
backward through any of them marks the forward's record used (once); a graph freed
without a backward puts its record on RELEASED, and a used one does not."""

import gc

import pytest
import torch

from modeguard.observe import graph
from modeguard.observe.graph import ForwardRecord, PresumedForward, attach, output_grad_fns
from models import MLP, Output, Pair, batch

pytestmark = pytest.mark.usefixtures("isolated")

@pytest.fixture
def released():
    """RELEASED as it was before the test (a guard would drain what a test left there)."""
    saved = list(graph.RELEASED)
    graph.RELEASED.clear()
    yield graph.RELEASED
    graph.RELEASED.clear()
    graph.RELEASED.extend(saved)


def _leaf():
    return torch.ones(3, requires_grad=True)


def _record():
    return ForwardRecord(root=None, snapshot=None, where=None, allowed=None, seq=0)


# ---- output_grad_fns ------------------------------------------------------------------------


def test_one_node_per_output_tensor_and_none_for_tensors_without_a_graph():
    x = _leaf()
    y = x * 2
    assert output_grad_fns(y) == [y.grad_fn]
    assert output_grad_fns(x) == []  # a leaf has no grad_fn
    assert output_grad_fns(y.detach()) == []
    with torch.no_grad():
        assert output_grad_fns(x * 2) == []
    assert output_grad_fns(None) == [] and output_grad_fns("text") == [] and output_grad_fns(3) == []


def test_nested_outputs_are_searched_and_each_node_is_listed_once():
    x = _leaf()
    a, b, c, d = x * 2, x + 1, x - 1, x.exp()
    out = {"a": [a, (None, {"b": b})], "pair": Pair(c, a), "data": Output(d, extra=3), "n": 1}
    assert output_grad_fns(out) == [a.grad_fn, b.grad_fn, c.grad_fn, d.grad_fn]
    assert output_grad_fns((a, a, a)) == [a.grad_fn]


def test_the_search_stops_below_four_levels_of_nesting():
    x = _leaf()
    y = x * 2
    assert output_grad_fns([[[[y]]]]) == [y.grad_fn]
    assert output_grad_fns([[[[[y]]]]]) == []


def test_at_most_sixteen_nodes():
    x = _leaf()
    outs = [x * i for i in range(20)]
    assert output_grad_fns(outs) == [t.grad_fn for t in outs[:16]]


def test_a_dataclass_type_is_not_searched_as_an_instance():
    assert output_grad_fns(Output) == []


# ---- records -------------------------------------------------------------------------------------


def test_record_and_presumed_forward_start_unused_and_empty():
    rec = ForwardRecord("root", "snap", ("code", 3), frozenset({"MG201"}), 7)
    assert (rec.root, rec.snapshot, rec.where, rec.allowed, rec.seq, rec.used) == (
        "root", "snap", ("code", 3), frozenset({"MG201"}), 7, False)
    presumed = PresumedForward()
    assert (presumed.snapshot, presumed.allowed, presumed.seq) == (None, None, -1)


# ---- attach: used or released -----------------------------------------------------------------------


def test_a_backward_marks_the_record_used_once(released):
    model = MLP()
    out = model(batch())
    rec, seen = _record(), []
    attach(rec, output_grad_fns(out), seen.append)
    assert not rec.used and seen == []
    out.sum().backward(retain_graph=True)
    assert rec.used and seen == [rec]
    out.sum().backward()  # a second backward through the same graph
    assert seen == [rec]
    del out
    gc.collect()
    assert list(released) == []  # used: not released


def test_a_backward_through_any_one_of_the_outputs_counts(released):
    x = _leaf()
    first, second = x * 2, x + 1
    rec, seen = _record(), []
    attach(rec, output_grad_fns((first, second)), seen.append)
    second.sum().backward()
    assert rec.used and seen == [rec]


def test_a_graph_freed_without_a_backward_puts_its_record_on_released(released):
    model = MLP().eval()
    out = model(batch())
    rec = _record()
    attach(rec, output_grad_fns(out), lambda r: pytest.fail("no backward ran"))
    assert list(released) == []  # the graph is alive
    del out
    gc.collect()
    assert list(released) == [rec] and not rec.used


def test_a_record_is_released_once_for_a_graph_watched_through_several_nodes(released):
    x = _leaf()
    outs = (x * 2, x + 1, x.exp())
    rec = _record()
    attach(rec, output_grad_fns(outs), lambda r: None)
    del outs
    gc.collect()
    assert list(released) == [rec]

