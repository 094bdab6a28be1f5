"""The README's rule table is generated from the rule objects; keep them in sync."""

import pathlib
import re

from modeguard.rules import RULES, rules_markdown

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_rule_table_matches_rule_objects():
    text = README.read_text()
    m = re.search(r"<!-- rules-table:start -->\n(.*?)<!-- rules-table:end -->", text, re.S)
    assert m, "README lost its rules-table markers"
    assert m.group(1) == rules_markdown(), "README rule table is stale: paste modeguard.rules.rules_markdown()"


def test_readme_names_every_rule_code_and_the_test_command():
    text = README.read_text()
    for code in RULES:
        assert code in text
    assert "make test" in text and "make demo" in text
