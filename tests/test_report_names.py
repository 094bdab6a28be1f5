"""modeguard.report.names: which modules a finding lists (leaves, not containers), and
repeated layers written once."""

from modeguard.report.names import collapse, leaves

BERT = [f"bert.encoder.layer.{i}.{leaf}" for i in range(12)
        for leaf in ("attention.self.dropout", "attention.output.dropout", "output.dropout")]


def test_leaves_drop_the_containers_of_listed_modules():
    names = ["(root)", "bert", "bert.embeddings.dropout", "bert.encoder.layer.0", "bert.encoder.layer.0.attention.self",
             "bert.encoder.layer.0.attention.self.dropout", "dropout"]
    assert leaves(names) == ["bert.embeddings.dropout", "bert.encoder.layer.0.attention.self.dropout", "dropout"]
    assert leaves(["(root)"]) == ["(root)"] and leaves(["bn", "drop"]) == ["bn", "drop"] and leaves([]) == []
    assert leaves(["enc", "encoder.drop"]) == ["enc", "encoder.drop"]  # a prefix of the name is not a parent


def test_collapse_writes_repeated_layers_once_in_place():
    names = ["bert.embeddings.dropout", *BERT, "dropout"]
    assert collapse(names) == [
        "bert.embeddings.dropout",
        "bert.encoder.layer.{0..11}.attention.self.dropout",
        "bert.encoder.layer.{0..11}.attention.output.dropout",
        "bert.encoder.layer.{0..11}.output.dropout",
        "dropout",
    ]


def test_collapse_keeps_gaps_nested_indices_and_plain_children_readable():
    assert collapse(["h.0.drop", "h.1.drop", "h.3.drop", "h.4.drop", "h.5.drop"]) == ["h.{0,1,3..5}.drop"]
    assert collapse(["backbone.1", "backbone.3"]) == ["backbone.1", "backbone.3"]  # a BatchNorm and a Dropout
    assert collapse(["a.0.b.1.c", "a.0.b.2.c", "a.1.b.1.c", "a.1.b.2.c"]) == ["a.{0,1}.b.{1,2}.c"]
    assert collapse(["1", "3"]) == ["1", "3"]  # a Sequential's children stay as they are
    assert collapse(["layer.0.drop", "head.drop"]) == ["layer.0.drop", "head.drop"]
