"""The plain-text renderer (modeguard/report/text.py): field values wrap with hanging
continuation lines, source locations stay whole, and the rich rendering of a report is
drawn from the same rows and wrapped the same way."""

import io
import re

import pytest
from rich.console import Console

from modeguard import Severity, Violation
from modeguard._frames import Location
from modeguard.observe.modes import ModeSite
from modeguard.report import Report
from modeguard.report.render import print_report
from modeguard.report.text import COLUMNS, WIDTH, hang, plain_table, report_text, table_rows, violation_text

LONG = "/a/rather/deep/folder/of/a/checkout/that/goes/on/and/on/for/some/time/train_the_model.py"
WHY = ("Dropout was switched off and BatchNorm normalised with its frozen running statistics "
       "while the model was being trained, so the network you optimise is not the one you designed.")


def _violation(file=LONG, **changes):
    fields = dict(
        code="MG101", name="step-in-eval", severity=Severity.ERROR,
        headline="optimizer.step() applied gradients from a forward in which the model ran in eval mode",
        model="Net", modules=["bn", "drop"], location=Location(file, 54, "train"),
        mode_set_at=ModeSite(training=False, how="Net.eval()", location=Location(file, 35, "validate")),
        fix="call model.train() before the training step (e.g. at the top of each epoch, after validate()).",
        why=WHY, first_step=2, count=3,
    )
    fields.update(changes)
    return Violation(**fields)


def _field_blocks(text):
    """{label: [lines]} of a message: each field line with its continuation lines."""
    blocks, label = {}, None
    for line in text.splitlines():
        m = re.match(r"  ([a-z ]+):\s", line)
        if m:
            label = m.group(1)
            blocks[label] = [line]
        elif label is not None:  # before the first field: the headline
            blocks[label].append(line)
    return blocks


def test_hang_indents_continuation_lines_under_the_text():
    out = hang("  why:      ", WHY, 40)
    lines = out.splitlines()
    assert len(lines) > 2 and all(len(line) <= 40 for line in lines)
    assert lines[0].startswith("  why:      Dropout")
    assert all(line.startswith(" " * 12) and line[12] != " " for line in lines[1:])
    assert " ".join(line.strip() for line in lines).replace("why: ", "", 1).split() == WHY.split()


def test_hang_never_breaks_a_word_or_a_hyphenated_name():
    out = hang("  x: ", "eval-graph-unused " * 6 + LONG, 30)
    assert "eval-graph-unused" in out.splitlines()[0]
    assert LONG in out.splitlines()[-1]
    assert hang("p: ", "a  b", None) == "p: a  b"  # no width: left as it is


def test_message_fields_hang_under_their_value_and_locations_stay_whole():
    v = _violation()
    text = violation_text(v)
    assert v.message == str(v) == text
    lines = text.splitlines()
    assert lines[0] == f"MG101 step-in-eval [error]: {v.headline}."  # whole, though long
    blocks = _field_blocks(text)
    assert list(blocks) == ["where", "model", "mode set", "why", "fix"]
    assert blocks["where"] == [f"  where:    {LONG}:54 in train()"]
    assert blocks["mode set"] == [f"  mode set: Net.eval() at {LONG}:35 in validate()"]
    assert blocks["model"] == ["  model:    Net; modules: bn, drop"]
    for label in ("why", "fix"):
        block = blocks[label]
        assert all(len(line) <= WIDTH for line in block), block
        assert all(line.startswith(" " * 12) and line[12] != " " for line in block[1:]), block
    assert len(blocks["why"]) > 1  # it did wrap
    assert " ".join(l.strip() for l in blocks["why"]).split()[1:] == WHY.split()


def test_a_narrow_screen_wraps_the_whole_lines_too_hanging():
    text = violation_text(_violation(file="/src/train.py"), width=50, screen=50)
    lines = text.splitlines()
    assert lines[1].startswith(" " * len("MG101 step-in-eval [error]: "))  # the headline hangs
    for label, block in _field_blocks(text).items():
        assert all(line.startswith(" " * 12) for line in block[1:]), (label, block)
    assert all(len(line) <= 50 for line in lines)


def test_model_field_lists_at_most_eight_modules():
    v = _violation(modules=[f"layer{i}" for i in range(10)])
    assert "modules: layer0, layer1, layer2, layer3, layer4, layer5, layer6, layer7, ... (10 in all)" in " ".join(
        line.strip() for line in _field_blocks(v.message)["model"])


def test_table_rows_and_the_plain_table():
    a = _violation(file="/src/train.py")
    b = _violation(code="MG401", name="eval-graph-unused", severity=Severity.INFO, modules=[], file="/src/train.py",
                   mode_set_at=ModeSite(training=False, how="assignment", location=None), count=1)
    c = _violation(code="MG602", name="step-without-backward", severity=Severity.WARNING, mode_set_at=None,
                   location=None, modules=list("abcde"))
    assert table_rows([a, b, c]) == [
        ("MG101 step-in-eval", "error", "3", "Net: bn, drop", "train.py:54", "Net.eval() at train.py:35"),
        ("MG401 eval-graph-unused", "info", "1", "Net", "train.py:54", "assignment"),
        ("MG602 step-without-backward", "warning", "3", "Net: a, b, c, d ...", "-", "-"),
    ]
    lines = plain_table([a, b, c])
    assert len(lines) == 4 and all(line.startswith("  ") and line == line.rstrip() for line in lines)
    rows = table_rows([a, b, c])
    for header, column in (("severity", 1), ("count", 2), ("where", 4)):  # the columns line up
        at = lines[0].index(header)
        assert [line[at:].split("  ")[0] for line in lines[1:]] == [row[column] for row in rows]


def test_report_text_and_str_report(monkeypatch):
    vs = [_violation(file="/src/train.py")]
    assert report_text(vs, "head", details=False) == "head\n" + "\n".join(plain_table(vs)) + "\n"
    assert report_text(vs, "head") == "head\n" + "\n".join(plain_table(vs)) + "\n\n" + vs[0].message + "\n"
    assert report_text([], "head") == "head\n"
    report = Report(vs)
    assert str(report) == report_text(vs, "modeguard report")
    monkeypatch.setenv("COLUMNS", "40")  # the plain text does not follow a terminal's width
    assert str(report) == report_text(vs, "modeguard report")
    assert str(Report([])) == "modeguard: no train/eval mode problems found.\n"


def _two():
    return [_violation(file="/src/train.py"),
            _violation(code="MG401", name="eval-graph-unused", severity=Severity.INFO, file="/src/eval.py")]


def test_rich_table_has_the_plain_tables_rows():
    vs = _two()
    table = Report(vs).table()
    assert [c.header for c in table.columns] == list(COLUMNS)
    assert list(zip(*(map(str, c.cells) for c in table.columns))) == table_rows(vs)


@pytest.mark.parametrize("width", [60, 100, 140])
def test_rich_rendering_never_wraps_a_message_flush_left(width):
    vs = _two()
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(Report(vs))
    out = buf.getvalue()
    messages = out[out.index("MG101 step-in-eval [error]"):]
    for line in messages.splitlines():
        assert len(line) <= width
        # Every line is a headline, a field, a hanging continuation or blank: none flush left.
        assert not line or line.startswith(("MG101 ", "MG401 ", "  ")), line
    if width >= 140:  # wide enough for every line: the plain messages, untouched
        assert all(v.message in out for v in vs)


def test_print_report_is_plain_text_off_a_terminal():
    buf = io.StringIO()
    report = Report([_violation(file="/src/train.py")])
    print_report(report, buf)
    assert buf.getvalue() == str(report)


def _hf_violation(**changes):
    leaves_ = ["bert.embeddings.dropout", *(f"bert.encoder.layer.{i}.{leaf}" for i in range(12)
                                          for leaf in ("attention.self.dropout", "output.dropout")), "dropout"]
    fields = dict(model="BertForSequenceClassification", modules=leaves_, file="/home/me/train.py",
                  mode_set_at=ModeSite(training=False, how="BertForSequenceClassification.eval()",
                                       location=Location("/home/me/train.py", 12, "main")))
    fields.update(changes)
    return _violation(**fields)


def test_the_table_of_a_large_model_fits_100_columns_and_the_message_lists_every_module():
    v = _hf_violation()
    lines = plain_table([v])
    assert all(len(line) <= 100 for line in lines), lines
    row = lines[1]
    assert "BertForSequenceClassif..." in row and row.endswith("eval() at train.py:12")  # the location whole
    wide = plain_table([v], width=200)[1]  # where there is room, the names
    assert "BertForSequenceClassification: bert.embeddings.dropout, bert.encoder.layer.{0..11}" in wide
    text = " ".join(line.strip() for line in _field_blocks(v.message)["model"])
    assert ("bert.encoder.layer.{0..11}.attention.self.dropout, bert.encoder.layer.{0..11}.output.dropout, "
            "dropout") in text and "(26 in all)" not in text  # four names now: all shown


def test_a_short_table_is_left_as_it_is():
    v = _violation(file="/src/train.py")
    assert table_rows([v])[0][5] == "Net.eval() at train.py:35" and table_rows([v])[0][5] in plain_table([v])[1]


def test_a_mode_set_by_a_framework_names_it_in_the_table_and_the_message():
    site = ModeSite(training=True, how="Net.train()", location=Location("/src/train.py", 40, "main"),
                    framework="Trainer.training_step (transformers)")
    v = _violation(file="/src/train.py", mode_set_at=site)
    assert table_rows([v])[0][5] == "Trainer.training_step: Net.train()"
    assert ("mode set: Net.train() by Trainer.training_step (transformers), inside the call at "
            "/src/train.py:40 in main()") in v.message


def test_the_rich_table_on_a_100_column_terminal_fits_it():
    buf = io.StringIO()
    Console(file=buf, width=100, color_system=None).print(Report([_hf_violation()]))
    assert all(len(line) <= 100 for line in buf.getvalue().splitlines())
    assert "eval() at train.py:12" in buf.getvalue()
