"""Tests of loading rule files: positions, messages, passes and the validate command."""

from __future__ import annotations

import io
import re
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel

from tdbot.rules import LoadedRule, RuleError, RuleSet, limits, load_rules, validate_command
from tdbot.rules.errors import model_at
from tdbot.rules.limits import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES
from tdbot.rules.positions import Position, toml_positions
from tdbot.rules.schema import (
    MAX_DURATION,
    RULE_KINDS,
    CheapestHostnodeRule,
    IdleStopRule,
    LowBalanceRule,
    SpotRebidRule,
    parse_duration,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_RULES = ROOT / "rules"
BAD = Path(__file__).resolve().parent / "rules_bad"
DOCS = ROOT / "docs" / "rules.md"
README = ROOT / "README.md"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def only_error(ruleset: RuleSet) -> RuleError:
    assert len(ruleset.errors) == 1, [str(error) for error in ruleset.errors]
    return ruleset.errors[0]


# --- shipped rules and docs ----------------------------------------------------------


def test_shipped_rules_load_without_errors() -> None:
    ruleset = load_rules(SHIPPED_RULES)

    assert [str(error) for error in ruleset.errors] == []
    assert {loaded.rule.kind for loaded in ruleset.rules} == set(RULE_KINDS)


def test_shipped_rules_use_yaml_and_toml() -> None:
    suffixes = {loaded.file.suffix for loaded in load_rules(SHIPPED_RULES).rules}

    assert ".yaml" in suffixes
    assert ".toml" in suffixes


def test_shipped_cheapest_rule_alerts_only() -> None:
    loaded = load_rules(SHIPPED_RULES / "cheapest-4090.yaml").rules[0]

    assert isinstance(loaded.rule, CheapestHostnodeRule)
    assert loaded.rule.match.gpu == ["geforcertx4090-pcie-24gb"]
    assert loaded.rule.alert.below_usd_per_hour == 0.60
    assert loaded.rule.deploy is None


def test_shipped_idle_rule_warns_first() -> None:
    loaded = load_rules(SHIPPED_RULES / "idle-stop.yaml").rules[0]

    assert isinstance(loaded.rule, IdleStopRule)
    assert loaded.rule.signals.gpu_util_below_percent is not None
    assert loaded.rule.warning > timedelta()


def test_shipped_low_balance_has_levels() -> None:
    loaded = load_rules(SHIPPED_RULES / "low-balance.toml").rules[0]

    assert isinstance(loaded.rule, LowBalanceRule)
    assert loaded.rule.fire_below_runway_hours is not None
    assert loaded.rule.clear_above_runway_hours is not None
    assert loaded.rule.fire_below_balance_usd is not None
    assert loaded.rule.clear_above_balance_usd is not None


def docs_examples(document: Path = DOCS) -> list[tuple[int, str, str]]:
    """Every fenced yaml or toml block of a document, with its line number."""
    text = document.read_text(encoding="utf-8")
    pattern = re.compile(r"^```(yaml|toml)\n(.*?)^```", re.MULTILINE | re.DOTALL)
    return [
        (text.count("\n", 0, match.start()) + 1, match.group(1), match.group(2))
        for match in pattern.finditer(text)
    ]


@pytest.mark.parametrize(
    ("line", "language", "example"), docs_examples(), ids=lambda value: str(value)[:12]
)
def test_docs_example_is_valid(line: int, language: str, example: str, tmp_path: Path) -> None:
    path = write(tmp_path, f"example-line-{line}.{language}", example)

    ruleset = load_rules(path)

    assert [str(error) for error in ruleset.errors] == []
    assert ruleset.rules


@pytest.mark.parametrize(
    ("line", "language", "example"), docs_examples(README), ids=lambda value: str(value)[:12]
)
def test_readme_example_is_valid(line: int, language: str, example: str, tmp_path: Path) -> None:
    path = write(tmp_path, f"readme-line-{line}.{language}", example)

    ruleset = load_rules(path)

    assert [str(error) for error in ruleset.errors] == []
    assert ruleset.rules


def test_docs_have_example_per_kind(tmp_path: Path) -> None:
    kinds = set()
    for line, language, example in docs_examples():
        path = write(tmp_path, f"example-line-{line}.{language}", example)
        kinds |= {loaded.rule.kind for loaded in load_rules(path).rules}

    assert kinds == set(RULE_KINDS)


def all_field_names(model: type[BaseModel]) -> set[str]:
    names = set()
    for name in model.model_fields:
        names.add(name)
        nested = model_at(model, (name,))
        if nested is not None:
            names |= all_field_names(nested)
    return names


@pytest.mark.parametrize("kind", sorted(RULE_KINDS))
def test_docs_describe_every_field(kind: str) -> None:
    text = DOCS.read_text(encoding="utf-8")

    missing = [name for name in all_field_names(RULE_KINDS[kind]) if f"`{name}`" not in text]

    assert missing == []


# --- broken files ------------------------------------------------------------------

BAD_FILES = [
    (
        "unknown_field.yaml",
        "4:1: evry: ",
        "unknown field 'evry'; did you mean 'every'? Valid fields: name, kind, every",
    ),
    (
        "unknown_kind.yaml",
        "2:7: kind: ",
        "did you mean 'cheapest_hostnode'? Valid kinds: cheapest_hostnode, idle_stop, "
        "low_balance, spot_rebid",
    ),
    ("duration_without_unit.toml", "5:10: window: ", "30 has no unit; write a duration such as"),
    ("missing_field.yaml", "2:1: bid: ", "missing required field 'bid'; add it"),
    ("wrong_type.toml", "14:13: match.gpu_count: ", "expected a whole number such as 1, got 'two'"),
    ("yaml_syntax.yaml", "6:12: syntax: ", "invalid YAML: expected ',' or ']'"),
    ("toml_syntax.toml", "3:11: syntax: ", 'put text in double quotes, such as every = "10m"'),
]
# Files in a subfolder, which loading the rules_bad folder does not read.
UNSAFE_FILES = [
    (
        "unsafe/python_tag.yaml",
        "4:8: tag: ",
        "tags are not allowed in rule files; remove !!python/object/apply:os.system",
    ),
    (
        "unsafe/duration_too_long.toml",
        "3:9: every: ",
        "is too long; a duration is at most 366 days",
    ),
]


@pytest.mark.parametrize(
    ("name", "prefix", "hint"),
    BAD_FILES + UNSAFE_FILES,
    ids=[case[0] for case in BAD_FILES + UNSAFE_FILES],
)
def test_bad_file_reports_position_and_fix(name: str, prefix: str, hint: str) -> None:
    path = BAD / name

    error = only_error(load_rules(path))

    assert str(error).startswith(f"{path}:{prefix}")
    assert hint in error.message


def test_bad_file_loads_no_rule_except_good_one() -> None:
    # wrong_type.toml holds a valid rule before the broken one.
    names = [loaded.name for loaded in load_rules(BAD / "wrong_type.toml").rules]

    assert names == ["good-low-balance"]


def test_duplicate_names_error_names_both_files() -> None:
    folder = BAD / "duplicate_names"

    ruleset = load_rules(folder)

    error = only_error(ruleset)
    assert str(error).startswith(f"{folder / 'b-second.toml'}:1:8: name: ")
    assert f"{folder / 'a-first.yaml'}:1:1" in error.message
    assert [loaded.file.name for loaded in ruleset.rules] == ["a-first.yaml"]


def test_duplicate_name_points_at_value(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD_RULE)
    yaml = "kind: low_balance\nname:   good\nevery: 15m\nfire_below_balance_usd: 5\n"
    write(tmp_path, "b.yaml", yaml)
    toml = '[[rule]]\nkind = "low_balance"\nname  =  "good"\nevery = "1h"\n'
    write(tmp_path, "c.toml", toml + "fire_below_balance_usd = 5\n")

    ruleset = load_rules(tmp_path)

    assert [(error.file.name, error.line, error.column) for error in ruleset.errors] == [
        ("b.yaml", 2, 9),
        ("c.toml", 3, 10),
    ]


def test_bad_rule_beside_good_one_keeps_good() -> None:
    folder = BAD / "mixed"

    ruleset = load_rules(folder)

    error = only_error(ruleset)
    assert str(error).startswith(f"{folder / 'bad.yaml'}:5:13: bid.step_usd: ")
    assert "lower step_usd or raise max_usd_per_hour" in error.message
    assert [loaded.name for loaded in ruleset.rules] == ["good-balance"]


def test_bad_folder_reports_every_file() -> None:
    ruleset = load_rules(BAD)

    files = {error.file.name for error in ruleset.errors}

    assert files == {name for name, _, _ in BAD_FILES}


# --- YAML ------------------------------------------------------------------------


def test_yaml_norway_stays_text(tmp_path: Path) -> None:
    text = """\
name: nordic-4090
kind: cheapest_hostnode
every: 10m
match:
  gpu: [geforcertx4090-pcie-24gb]
  countries: [NO, SE, FI]
"""
    ruleset = load_rules(write(tmp_path, "nordic.yaml", text))

    rule = ruleset.rules[0].rule
    assert isinstance(rule, CheapestHostnodeRule)
    assert rule.match.countries == ["NO", "SE", "FI"]


def test_yaml_sexagesimal_stays_text(tmp_path: Path) -> None:
    text = "name: clock\nkind: low_balance\nevery: 1:30\nfire_below_balance_usd: 5\n"

    error = only_error(load_rules(write(tmp_path, "clock.yaml", text)))

    assert str(error).startswith(f"{tmp_path / 'clock.yaml'}:3:8: every: '1:30' is not a duration")


def test_yaml_list_of_rules_positions(tmp_path: Path) -> None:
    text = """\
# Two rules.
- name: first
  kind: low_balance
  every: 15m
  fire_below_runway_hours: 24

- name: second
  kind: low_balance
  every: 15m
  fire_below_runway_hours: 12
  repeat_evry: 1h
"""
    ruleset = load_rules(write(tmp_path, "list.yaml", text))

    assert [(loaded.name, loaded.line, loaded.column) for loaded in ruleset.rules] == [
        ("first", 2, 3)
    ]
    assert str(only_error(ruleset)).startswith(f"{tmp_path / 'list.yaml'}:11:3: repeat_evry: ")


def test_yaml_documents_each_load(tmp_path: Path) -> None:
    text = """\
name: one
kind: low_balance
every: 15m
fire_below_runway_hours: 24
---
- name: two
  kind: low_balance
  every: 15m
  fire_below_balance_usd: 10
---
"""
    ruleset = load_rules(write(tmp_path, "docs.yaml", text))

    assert [(loaded.name, loaded.line) for loaded in ruleset.rules] == [("one", 1), ("two", 6)]
    assert ruleset.errors == []


def test_yaml_scalar_document_is_shape_error(tmp_path: Path) -> None:
    error = only_error(load_rules(write(tmp_path, "scalar.yaml", "just some text\n")))

    assert error.field == "rule"
    assert "expected a rule, a mapping with name, kind and every or cron" in error.message


def test_yaml_list_item_not_mapping(tmp_path: Path) -> None:
    text = "- name: ok\n  kind: low_balance\n  every: 15m\n  fire_below_runway_hours: 2\n- oops\n"

    ruleset = load_rules(write(tmp_path, "items.yaml", text))

    assert str(only_error(ruleset)).startswith(f"{tmp_path / 'items.yaml'}:5:3: rule: ")
    assert [loaded.name for loaded in ruleset.rules] == ["ok"]


def test_yaml_duplicate_key_is_syntax_error(tmp_path: Path) -> None:
    text = "name: a\nkind: low_balance\nevery: 15m\nevery: 30m\n"

    error = only_error(load_rules(write(tmp_path, "dup.yaml", text)))

    assert str(error).startswith(f"{tmp_path / 'dup.yaml'}:4:1: syntax: ")
    assert "remove or rename one of the two keys" in error.message


def test_yaml_tab_indent_hint(tmp_path: Path) -> None:
    text = "name: a\nkind: low_balance\nmatch:\n\tgpu: x\n"

    error = only_error(load_rules(write(tmp_path, "tab.yaml", text)))

    assert error.line == 4
    assert "indent with spaces, not tabs" in error.message


def test_yaml_empty_value_hint(tmp_path: Path) -> None:
    text = "name: a\nkind: idle_stop\nevery: 2m\nwindow:\n"

    error = only_error(load_rules(write(tmp_path, "empty.yaml", text)))

    assert str(error).startswith(f"{tmp_path / 'empty.yaml'}:4:1: window: no value given; ")
    assert "a duration with a unit" in error.message


def test_yaml_nested_missing_field_position(tmp_path: Path) -> None:
    text = """\
name: deployer
kind: cheapest_hostnode
every: 10m
match:
  gpu: [geforcertx4090-pcie-24gb]
deploy:
  enabled: true
"""
    error = only_error(load_rules(write(tmp_path, "deploy.yaml", text)))

    assert str(error).startswith(
        f"{tmp_path / 'deploy.yaml'}:6:1: deploy.max_usd_per_hour: "
        "missing required field 'max_usd_per_hour'"
    )
    assert "add it under 'deploy' as a number" in error.message


def test_yaml_list_item_error_position(tmp_path: Path) -> None:
    text = """\
name: ports
kind: cheapest_hostnode
every: 10m
match:
  gpu: [geforcertx4090-pcie-24gb]
deploy:
  max_usd_per_hour: 0.5
  internal_ports: [22, 70000]
"""
    error = only_error(load_rules(write(tmp_path, "ports.yaml", text)))

    assert str(error).startswith(f"{tmp_path / 'ports.yaml'}:8:24: deploy.internal_ports[1]: ")
    assert "must be at most 65535" in error.message


def test_yaml_string_for_list_hint(tmp_path: Path) -> None:
    text = "name: a\nkind: cheapest_hostnode\nevery: 10m\nmatch:\n  gpu: l4-pcie-24gb\n"

    error = only_error(load_rules(write(tmp_path, "gpu.yaml", text)))

    assert error.field == "match.gpu"
    assert 'write it as ["l4-pcie-24gb"]' in error.message


def test_yaml_literal_error_lists_choices(tmp_path: Path) -> None:
    text = "name: a\nkind: idle_stop\nevery: 2m\nwindow: 30m\naction: shutdown\n"

    error = only_error(load_rules(write(tmp_path, "action.yaml", text)))

    assert error.field == "action"
    assert error.message == "'shutdown' is not allowed; use one of: 'stop' or 'stop_release'"


def test_yaml_bool_field_wrong_type(tmp_path: Path) -> None:
    text = "name: a\nkind: low_balance\nevery: 15m\nfire_below_runway_hours: 2\nenabled: maybe\n"

    error = only_error(load_rules(write(tmp_path, "bool.yaml", text)))

    assert error.field == "enabled"
    assert error.message == "expected true or false, got 'maybe'"


def test_yaml_missing_kind_lists_kinds(tmp_path: Path) -> None:
    error = only_error(load_rules(write(tmp_path, "nokind.yaml", "name: a\nevery: 10m\n")))

    assert str(error).startswith(f"{tmp_path / 'nokind.yaml'}:1:1: kind: missing required field")
    assert "cheapest_hostnode, idle_stop, low_balance, spot_rebid" in error.message


def test_messages_carry_no_pydantic_noise(tmp_path: Path) -> None:
    text = "name: Bad Name\nkind: low_balance\nevery: 5\ntimezone: Mars/Base\n"

    ruleset = load_rules(write(tmp_path, "noise.yaml", text))

    assert len(ruleset.errors) == 3
    for error in ruleset.errors:
        assert "Value error" not in error.message
        assert "http" not in error.message
        assert "Input should" not in error.message


# --- limits and unsafe input ------------------------------------------------------


def alias_bomb(levels: int = 10, copies: int = 9) -> str:
    """A "billion laughs" document: each anchor lists `copies` aliases of the one before."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * copies) + "]"]
    for level in range(1, levels):
        aliases = ", ".join([f"*a{level - 1}"] * copies)
        lines.append(f"a{level}: &a{level} [{aliases}]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_rejected(tmp_path: Path) -> None:
    write(tmp_path, "a-bomb.yaml", alias_bomb())
    write(tmp_path, "b-good.yaml", GOOD_RULE)

    ruleset = load_rules(tmp_path)

    error = only_error(ruleset)
    # a4 expands to 66430 nodes, so the first *a4 on line 6 passes the budget.
    assert str(error).startswith(f"{tmp_path / 'a-bomb.yaml'}:6:10: alias: ")
    assert f"too many nodes after expanding aliases: more than {MAX_NODES}" in error.message
    assert "rule files need no nested aliases" in error.message
    assert [loaded.name for loaded in ruleset.rules] == ["good"]


def test_yaml_alias_chain_too_deep(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x]"]
    lines += [f"a{level}: &a{level} [*a{level - 1}]" for level in range(1, MAX_DEPTH + 1)]

    error = only_error(load_rules(write(tmp_path, "chain.yaml", "\n".join(lines) + "\n")))

    assert (error.line, error.field) == (MAX_DEPTH, "alias")
    assert "nesting too deep after expanding aliases" in error.message


def test_yaml_alias_inside_own_anchor(tmp_path: Path) -> None:
    text = "name: loop\nkind: spot_rebid\nevery: 1m\nselect: &s {names: [*s]}\n"

    error = only_error(load_rules(write(tmp_path, "loop.yaml", text)))

    assert str(error).startswith(f"{tmp_path / 'loop.yaml'}:4:21: alias: alias *s is inside")


def test_yaml_shared_anchor_loads(tmp_path: Path) -> None:
    text = """\
- name: rebid-training
  kind: spot_rebid
  every: 1m
  select: &training {names: ["train-*"], exclude_names: [train-debug]}
  bid: {step_usd: 0.02, max_usd_per_hour: 0.5}
- name: idle-training
  kind: idle_stop
  every: 2m
  window: 30m
  select: *training
"""
    ruleset = load_rules(write(tmp_path, "shared.yaml", text))

    assert ruleset.errors == []
    spot, idle = (loaded.rule for loaded in ruleset.rules)
    assert isinstance(spot, SpotRebidRule)
    assert isinstance(idle, IdleStopRule)
    assert spot.select == idle.select
    assert idle.select.exclude_names == ["train-debug"]


def test_yaml_merge_key_loads(tmp_path: Path) -> None:
    text = """\
- &base
  name: first
  kind: low_balance
  every: 15m
  fire_below_balance_usd: 20
- <<: *base
  name: second
"""
    ruleset = load_rules(write(tmp_path, "merge.yaml", text))

    assert ruleset.errors == []
    assert [loaded.name for loaded in ruleset.rules] == ["first", "second"]


def test_yaml_many_nodes_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A lower budget keeps the test fast, because parsing MAX_NODES values takes seconds.
    monkeypatch.setattr(limits, "MAX_NODES", 1_000)
    text = GOOD_RULE + "---\n" + "[" + ", ".join(["1"] * 1_000) + "]\n"

    error = only_error(load_rules(write(tmp_path, "many.yaml", text)))

    # The rule has 9 nodes and the list 1, so its item 991 (index 990) is node 1001.
    assert str(error).startswith(f"{tmp_path / 'many.yaml'}:6:{2 + 3 * 990}: file: ")
    assert "too many nodes: more than 1000 lists, mappings and values" in error.message


@pytest.mark.parametrize("depth", [MAX_DEPTH, 1_000, 100_000])
def test_yaml_deep_nesting_rejected(depth: int, tmp_path: Path) -> None:
    text = "name: deep\nkind: spot_rebid\nselect: " + "[" * depth + "]" * depth + "\n"

    error = only_error(load_rules(write(tmp_path, "deep.yaml", text)))

    # The rule mapping is the first level, so the bracket at column 9 + 31 is the 33rd.
    assert str(error).startswith(f"{tmp_path / 'deep.yaml'}:3:{9 + MAX_DEPTH - 1}: nesting: ")
    assert error.message.startswith(f"nesting too deep: more than {MAX_DEPTH} levels")


def test_yaml_block_nesting_rejected(tmp_path: Path) -> None:
    text = "".join(f"{'  ' * level}k{level}:\n" for level in range(MAX_DEPTH + 1))

    error = only_error(load_rules(write(tmp_path, "block.yaml", text)))

    assert error.field == "nesting"
    assert error.line == MAX_DEPTH + 1


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 300, 100_000])
def test_toml_deep_nesting_rejected(depth: int, tmp_path: Path) -> None:
    write(tmp_path, "a-deep.toml", "x = " + "[" * depth + "]" * depth + "\n")
    write(tmp_path, "b-good.yaml", GOOD_RULE)

    ruleset = load_rules(tmp_path)

    error = only_error(ruleset)
    assert str(error).startswith(f"{tmp_path / 'a-deep.toml'}:1:{5 + MAX_DEPTH}: nesting: ")
    assert error.message.startswith(f"nesting too deep: more than {MAX_DEPTH} levels")
    assert [loaded.name for loaded in ruleset.rules] == ["good"]


def test_yaml_python_tag_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    command = f'!!python/object/apply:os.system ["touch {marker}"]'
    text = f"name: a\nkind: low_balance\nevery: {command}\n"

    error = only_error(load_rules(write(tmp_path, "tag.yaml", text)))

    assert str(error).startswith(f"{tmp_path / 'tag.yaml'}:3:8: tag: tags are not allowed")
    assert not marker.exists()


@pytest.mark.parametrize("tag", ["!custom", "!!str", "!!float"])
def test_yaml_scalar_tag_rejected(tag: str, tmp_path: Path) -> None:
    text = f"name: a\nkind: low_balance\nevery: 15m\nfire_below_balance_usd: {tag} 20\n"

    error = only_error(load_rules(write(tmp_path, "tag.yaml", text)))

    assert str(error).startswith(f"{tmp_path / 'tag.yaml'}:4:25: tag: ")
    assert f"remove {tag} and write the plain value" in error.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("99999999999999999999d", "'99999999999999999999d' is too long"),
        ("367d", "'367d' is too long"),
        ("200d200d", "'200d200d' is too long"),
        ("9" * 400 + "w", "is too long"),
    ],
    ids=["overflow", "one-day-over", "sum-over", "float-overflow"],
)
def test_duration_above_maximum_rejected(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="a duration is at most 366 days") as caught:
        parse_duration(text)

    assert message in str(caught.value)


def test_duration_at_maximum_loads(tmp_path: Path) -> None:
    text = "name: yearly\nkind: low_balance\nevery: 366d\nfire_below_balance_usd: 20\n"

    ruleset = load_rules(write(tmp_path, "yearly.yaml", text))

    assert ruleset.errors == []
    assert ruleset.rules[0].rule.every == MAX_DURATION


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", ".NaN"])
def test_yaml_money_not_finite(value: str, tmp_path: Path) -> None:
    text = f"name: a\nkind: low_balance\nevery: 15m\nfire_below_balance_usd: {value}\n"

    error = only_error(load_rules(write(tmp_path, "money.yaml", text)))

    assert str(error).startswith(f"{tmp_path / 'money.yaml'}:4:25: fire_below_balance_usd: ")
    assert "is not a finite number; write a number such as 0.5" in error.message


@pytest.mark.parametrize("value", ["inf", "+inf", "nan", "-nan"])
def test_toml_percent_not_finite(value: str, tmp_path: Path) -> None:
    text = 'name = "a"\nkind = "idle_stop"\nevery = "2m"\nwindow = "30m"\n'
    text += f"[signals]\ngpu_util_below_percent = {value}\n"

    error = only_error(load_rules(write(tmp_path, "percent.toml", text)))

    assert str(error).startswith(
        f"{tmp_path / 'percent.toml'}:6:26: signals.gpu_util_below_percent: "
    )
    assert "is not a finite number" in error.message


# --- model-level errors ------------------------------------------------------------


def test_schedule_both_set_points_at_every(tmp_path: Path) -> None:
    text = 'name: a\nkind: low_balance\nfire_below_balance_usd: 5\nevery: 10m\ncron: "0 * * * *"\n'

    error = only_error(load_rules(write(tmp_path, "both.yaml", text)))

    assert str(error).startswith(f"{tmp_path / 'both.yaml'}:4:8: every: set exactly one of")


def test_schedule_missing_points_at_rule(tmp_path: Path) -> None:
    text = "name: a\nkind: low_balance\nfire_below_balance_usd: 5\n"

    error = only_error(load_rules(write(tmp_path, "none.yaml", text)))

    assert str(error).startswith(f"{tmp_path / 'none.yaml'}:1:1: every: set exactly one of")


def test_ladder_step_error_points_inside_bid(tmp_path: Path) -> None:
    text = "name: a\nkind: spot_rebid\nevery: 1m\nbid:\n  max_usd_per_hour: 0.5\n"

    error = only_error(load_rules(write(tmp_path, "ladder.yaml", text)))

    assert str(error).startswith(
        f"{tmp_path / 'ladder.yaml'}:4:1: bid.step_usd: set exactly one of 'step_usd'"
    )


def test_low_balance_flap_points_at_clear(tmp_path: Path) -> None:
    text = """\
name: flap
kind: low_balance
every: 15m
fire_below_runway_hours: 24
clear_above_runway_hours: 12
"""
    error = only_error(load_rules(write(tmp_path, "flap.yaml", text)))

    assert str(error).startswith(f"{tmp_path / 'flap.yaml'}:5:27: clear_above_runway_hours: ")
    assert "or the alert would flap" in error.message


# --- TOML ------------------------------------------------------------------------


def test_toml_rule_tables_positions(tmp_path: Path) -> None:
    text = """\
# Two rules.
[[rule]]
name = "first"
kind = "low_balance"
every = "15m"
fire_below_runway_hours = 24

[[rule]]
name = "second"
kind = "spot_rebid"
every = "1m"

[rule.bid]
step_usd = 0.05
max_usd_per_hour = 0.5
max_stepz = 3
"""
    ruleset = load_rules(write(tmp_path, "two.toml", text))

    assert [(loaded.name, loaded.line, loaded.column) for loaded in ruleset.rules] == [
        ("first", 2, 1)
    ]
    error = only_error(ruleset)
    assert str(error).startswith(f"{tmp_path / 'two.toml'}:16:1: bid.max_stepz: ")
    assert "did you mean 'max_steps'?" in error.message


def test_toml_missing_field_in_second_rule(tmp_path: Path) -> None:
    text = """\
[[rule]]
name = "first"
kind = "low_balance"
every = "15m"
fire_below_runway_hours = 24

[[rule]]
name = "second"
kind = "idle_stop"
every = "2m"
"""
    error = only_error(load_rules(write(tmp_path, "two.toml", text)))

    assert str(error).startswith(f"{tmp_path / 'two.toml'}:7:1: window: missing required field")


def test_toml_top_level_rule_start(tmp_path: Path) -> None:
    text = '# A comment first.\n\nname = "solo"\nkind = "low_balance"\nevery = "15m"\n'
    text += "fire_below_runway_hours = 24\n"

    loaded = load_rules(write(tmp_path, "solo.toml", text)).rules[0]

    assert (loaded.line, loaded.column) == (3, 1)


def test_toml_keys_beside_rule_tables(tmp_path: Path) -> None:
    text = 'every = "10m"\n\n[[rule]]\nname = "a"\nkind = "low_balance"\n'

    error = only_error(load_rules(write(tmp_path, "mixed.toml", text)))

    assert str(error).startswith(f"{tmp_path / 'mixed.toml'}:1:1: every: ")
    assert "move it into a [[rule]] table" in error.message


def test_toml_single_rule_table_hint(tmp_path: Path) -> None:
    text = '[rule]\nname = "a"\nkind = "low_balance"\n'

    error = only_error(load_rules(write(tmp_path, "single.toml", text)))

    assert str(error).startswith(f"{tmp_path / 'single.toml'}:1:1: rule: ")
    assert "two brackets" in error.message


def test_toml_end_of_document_position(tmp_path: Path) -> None:
    error = only_error(load_rules(write(tmp_path, "cut.toml", 'name = "a"\nmatch = [1,')))

    assert (error.line, error.column) == (2, 12)
    assert error.message.startswith("invalid TOML: Invalid value; ")


def test_toml_positions_inline_values() -> None:
    text = """\
a = { b = 1, "c d" = [10, 20] }
list = [
  "x",  # comment with ] and ,
  { e = 'y' },
]
"""
    positions = toml_positions(text, max_depth=MAX_DEPTH)

    assert positions.keys[("a", "b")] == Position(1, 7)
    assert positions.keys[("a", "c d")] == Position(1, 14)
    assert positions.values[("a", "c d", 1)] == Position(1, 27)
    assert positions.values[("list", 0)] == Position(3, 3)
    assert positions.keys[("list", 1, "e")] == Position(4, 5)


def test_toml_positions_multiline_strings() -> None:
    text = 'a = """\nline ] "" \\"""\n"""\n'
    text += "b.c = '''x'''\n"
    text += "[t]\nd = 1979-05-27 07:32:00Z\ne = 2\n"
    assert tomllib.loads(text)["t"]["e"] == 2

    positions = toml_positions(text, max_depth=MAX_DEPTH)

    assert positions.keys[("b",)] == Position(4, 1)
    assert positions.keys[("b", "c")] == Position(4, 3)
    assert positions.keys[("t",)] == Position(5, 1)
    assert positions.values[("t", "e")] == Position(7, 5)


def test_toml_positions_nested_arrays_of_tables() -> None:
    text = "[[a]]\nx = 1\n[[a]]\nx = 2\n[a.b]\ny = 3\n"

    positions = toml_positions(text, max_depth=MAX_DEPTH)

    assert positions.keys[("a", 1, "x")] == Position(4, 1)
    assert positions.keys[("a", 1, "b", "y")] == Position(6, 1)


# --- meaning ---------------------------------------------------------------------

MEANING_CASES = [
    (
        "uptime-fraction",
        "kind: cheapest_hostnode\nevery: 10m\nmatch:\n  gpu: [l4-pcie-24gb]\n"
        "  min_uptime_percent: 0.99\n",
        "match.min_uptime_percent",
        "write 99 for 99%",
    ),
    (
        "silent-cheapest",
        "kind: cheapest_hostnode\nevery: 10m\nmatch:\n  gpu: [l4-pcie-24gb]\n"
        "alert:\n  on_new_best: false\n",
        "alert",
        "this rule never alerts and never deploys",
    ),
    (
        "zero-deploy-cap",
        "kind: cheapest_hostnode\nevery: 10m\nmatch:\n  gpu: [l4-pcie-24gb]\n"
        "deploy:\n  enabled: true\n  max_usd_per_hour: 0\n",
        "deploy.max_usd_per_hour",
        "a cap of 0 never deploys",
    ),
    (
        "zero-spot-step",
        "kind: spot_rebid\nevery: 1m\nbid:\n  step_usd: 0\n  max_usd_per_hour: 0.5\n",
        "bid.step_usd",
        "a step of 0 never raises the bid",
    ),
    (
        "zero-idle-threshold",
        "kind: idle_stop\nevery: 2m\nwindow: 30m\nsignals:\n  gpu_util_below_percent: 0\n",
        "signals.gpu_util_below_percent",
        "never counts as idle",
    ),
    (
        "runway-shorter-than-interval",
        "kind: low_balance\nevery: 2h\nfire_below_runway_hours: 1\n",
        "fire_below_runway_hours",
        "the rule runs every 2h, longer than the runway of 1 h",
    ),
    (
        "zero-balance-level",
        "kind: low_balance\nevery: 15m\nfire_below_balance_usd: 0\n",
        "fire_below_balance_usd",
        "set a balance such as 20",
    ),
    (
        "cron-weekday-number",
        'kind: low_balance\ncron: "0 9 * * 1-5"\nfire_below_balance_usd: 5\n',
        "cron",
        "write names such as 'mon-fri'",
    ),
    (
        "cron-out-of-range",
        'kind: low_balance\ncron: "61 * * * *"\nfire_below_balance_usd: 5\n',
        "cron",
        "invalid cron expression '61 * * * *'",
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "field", "hint"), MEANING_CASES, ids=[case[0] for case in MEANING_CASES]
)
def test_meaning_check_rejects(name: str, body: str, field: str, hint: str, tmp_path: Path) -> None:
    path = write(tmp_path, f"{name}.yaml", f"name: {name}\n{body}")

    ruleset = load_rules(path)

    error = only_error(ruleset)
    assert error.field == field
    assert hint in error.message
    assert ruleset.rules == []


def test_cron_with_weekday_names_loads(tmp_path: Path) -> None:
    text = 'name: a\nkind: low_balance\ncron: "0 9 * * mon-fri"\ntimezone: Europe/Berlin\n'
    text += "fire_below_balance_usd: 5\n"

    ruleset = load_rules(write(tmp_path, "cron.yaml", text))

    assert ruleset.errors == []


def test_spot_step_within_cap_loads(tmp_path: Path) -> None:
    text = (
        "name: a\nkind: spot_rebid\nevery: 1m\nbid:\n  step_usd: 0.05\n  max_usd_per_hour: 0.05\n"
    )

    ruleset = load_rules(write(tmp_path, "spot.yaml", text))

    assert isinstance(ruleset.rules[0].rule, SpotRebidRule)


# --- files and folders -------------------------------------------------------------

GOOD_RULE = "name: good\nkind: low_balance\nevery: 15m\nfire_below_balance_usd: 20\n"


def test_folder_skips_hidden_and_others(tmp_path: Path) -> None:
    rule = "kind: low_balance\nevery: 15m\nfire_below_runway_hours: 24\n"
    write(tmp_path, "b.yml", f"name: b\n{rule}")
    write(tmp_path, "a.yaml", f"name: a\n{rule}")
    write(tmp_path, ".hidden.yaml", "not: [valid")
    write(tmp_path, "notes.md", "# notes")
    (tmp_path / "nested").mkdir()
    write(tmp_path / "nested", "c.yaml", "not: [valid")

    ruleset = load_rules(tmp_path)

    assert [loaded.name for loaded in ruleset.rules] == ["a", "b"]
    assert ruleset.errors == []
    assert [path.name for path in ruleset.files] == ["a.yaml", "b.yml"]


def test_empty_files_are_errors(tmp_path: Path) -> None:
    write(tmp_path, "a-comment.yaml", "# nothing here yet\n")
    write(tmp_path, "b-documents.yaml", "---\n---\n")
    write(tmp_path, "c-empty.toml", "")
    write(tmp_path, "d-good.yaml", GOOD_RULE)

    ruleset = load_rules(tmp_path)

    assert [str(error) for error in ruleset.errors] == [
        f"{tmp_path / name}:1:1: file: file contains no rule; add one or delete the file"
        for name in ("a-comment.yaml", "b-documents.yaml", "c-empty.toml")
    ]
    assert [loaded.name for loaded in ruleset.rules] == ["good"]


def test_dangling_symlink_in_folder(tmp_path: Path) -> None:
    (tmp_path / "a-link.yaml").symlink_to(tmp_path / "gone.yaml")
    write(tmp_path, "b-good.yaml", GOOD_RULE)

    ruleset = load_rules(tmp_path)

    error = only_error(ruleset)
    assert str(error).startswith(f"{tmp_path / 'a-link.yaml'}:1:1: path: ")
    assert f"symbolic link to '{tmp_path / 'gone.yaml'}', which does not exist" in error.message
    assert [loaded.name for loaded in ruleset.rules] == ["good"]


def test_dangling_symlink_as_path(tmp_path: Path) -> None:
    link = tmp_path / "link.toml"
    link.symlink_to("missing.toml")

    error = only_error(load_rules(link))

    assert error.field == "path"
    assert "symbolic link to 'missing.toml', which does not exist" in error.message


def test_large_file_is_error(tmp_path: Path) -> None:
    padding = "#" * 99 + "\n"
    text = GOOD_RULE + padding * (MAX_FILE_BYTES // len(padding) + 1)
    write(tmp_path, "a-large.yaml", text)
    write(tmp_path, "b-good.yaml", GOOD_RULE)

    ruleset = load_rules(tmp_path)

    error = only_error(ruleset)
    assert str(error).startswith(f"{tmp_path / 'a-large.yaml'}:1:1: file: file is ")
    assert "larger than the limit of 1 MiB for a rule file" in error.message
    assert [loaded.name for loaded in ruleset.rules] == ["good"]


def test_missing_path_is_error(tmp_path: Path) -> None:
    error = only_error(load_rules(tmp_path / "absent"))

    assert str(error) == (
        f"{tmp_path / 'absent'}:1:1: path: no such file or folder; "
        "pass a rule file or a folder of rule files"
    )


def test_unsupported_suffix_is_error(tmp_path: Path) -> None:
    error = only_error(load_rules(write(tmp_path, "rule.json", "{}")))

    assert "rule files end in .yaml, .yml or .toml" in error.message


def test_undecodable_file_is_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")

    error = only_error(load_rules(path))

    assert error.field == "file"
    assert "UTF-8" in error.message


def test_rule_error_renders_prefix() -> None:
    error = RuleError(Path("rules/a.yaml"), 3, 7, "bid.step_usd", "must be at least 0")

    assert str(error) == "rules/a.yaml:3:7: bid.step_usd: must be at least 0"


def test_loaded_rule_location(tmp_path: Path) -> None:
    path = write(
        tmp_path, "a.yaml", "name: a\nkind: low_balance\nevery: 1h\nfire_below_runway_hours: 5\n"
    )

    loaded = load_rules(path).rules[0]

    assert isinstance(loaded, LoadedRule)
    assert loaded.location == f"{path}:1:1"


# --- validate command ----------------------------------------------------------------


def test_validate_command_shipped_rules() -> None:
    out = io.StringIO()

    code = validate_command(SHIPPED_RULES, out)

    assert code == 0
    assert out.getvalue() == "4 rules OK in 4 files\n"


def test_validate_command_reports_errors() -> None:
    out = io.StringIO()

    code = validate_command(BAD / "mixed", out)

    lines = out.getvalue().splitlines()
    assert code == 1
    assert lines[0].startswith(f"{BAD / 'mixed' / 'bad.yaml'}:5:13: bid.step_usd: ")
    assert lines[1] == "1 error in 1 of 2 files"
    assert len(lines) == 2


def test_validate_command_counts_bad_files() -> None:
    out = io.StringIO()

    code = validate_command(BAD, out)

    lines = out.getvalue().splitlines()
    assert code == 1
    assert lines[-1] == f"{len(BAD_FILES)} errors in {len(BAD_FILES)} of {len(BAD_FILES)} files"
    assert len(lines) == len(BAD_FILES) + 1


def test_validate_command_single_file(tmp_path: Path) -> None:
    path = write(tmp_path, "a.toml", 'name = "a"\nkind = "low_balance"\nevery = "1h"\n')
    path.write_text(path.read_text() + "fire_below_runway_hours = 5\n")
    out = io.StringIO()

    code = validate_command(path, out)

    assert code == 0
    assert out.getvalue() == "1 rule OK in 1 file\n"
