"""Limits that keep a broken or hostile rule file from exhausting time, memory or the stack.

A rule file is small: a few rules of a few dozen values, nested four or five levels.
The limits below are far above that, and low enough that loading the largest file they
allow takes seconds, not minutes. YAML is checked on its parse events, before ruamel.yaml
builds any Python object, so an alias bomb ("billion laughs") or a thousand nested
brackets is rejected before it can expand or recurse.
"""

from __future__ import annotations

from dataclasses import dataclass

from ruamel.yaml import YAML
from ruamel.yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    Event,
    NodeEvent,
)

from tdbot.rules.positions import Position

MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 100_000
MAX_DEPTH = 32

_YAML_TAG_PREFIX = "tag:yaml.org,2002:"


class LimitExceeded(Exception):
    """A rule file breaks one of the limits, or uses a YAML feature rule files forbid."""

    def __init__(self, position: Position, field: str, message: str) -> None:
        super().__init__(message)
        self.position = position
        self.field = field
        self.message = message


def too_deep_message() -> str:
    """Return the error message for lists and mappings nested deeper than MAX_DEPTH."""
    return (
        f"nesting too deep: more than {MAX_DEPTH} levels of lists and mappings; "
        "a rule needs only a few, so remove the extra brackets or indentation"
    )


@dataclass
class _Collection:
    """A sequence or mapping whose end event has not been read yet."""

    anchor: str | None
    nodes: int = 1
    height: int = 1


@dataclass(frozen=True)
class _Shape:
    """Size of a node with its aliases expanded: nodes, and levels of collections in it."""

    nodes: int
    height: int


def check_yaml_events(text: str) -> None:
    """Reject tags, deep nesting and too many nodes in a YAML text, counting aliases expanded.

    Raises LimitExceeded at the offending event, or ruamel's MarkedYAMLError when the
    text is not valid YAML. Reads events one at a time, so it stops at the first problem.
    """
    open_collections: list[_Collection] = []
    anchored: dict[str, _Shape] = {}
    total = 0

    for event in YAML(typ="rt").parse(text):
        if not isinstance(event, NodeEvent | CollectionEndEvent):
            continue

        # 1. Open a collection. Its size is known only at its end event.
        if isinstance(event, CollectionStartEvent):
            _check_tag(event)
            open_collections.append(_Collection(event.anchor))
            total += 1
            if len(open_collections) > MAX_DEPTH:
                raise LimitExceeded(_position(event), "nesting", too_deep_message())
            continue

        # 2. Find the size of the finished node: a closed collection, an alias or a scalar.
        anchor = None
        if isinstance(event, CollectionEndEvent):
            collection = open_collections.pop()
            shape = _Shape(collection.nodes, collection.height)
            anchor = collection.anchor
        elif isinstance(event, AliasEvent):
            shape = _alias_shape(event, anchored, open_collections)
            total += shape.nodes
        else:
            _check_tag(event)
            shape = _Shape(1, 0)
            total += 1
            anchor = event.anchor

        # 3. Remember anchored nodes for their aliases, and add the node to its parent.
        if anchor is not None:
            anchored[anchor] = shape
        if open_collections:
            parent = open_collections[-1]
            parent.nodes += shape.nodes
            parent.height = max(parent.height, shape.height + 1)
        _check_total(event, total)


def _check_tag(event: NodeEvent) -> None:
    # Tags select Python constructors (`!!python/object/apply`) or custom types that
    # the rule schema never needs, so no tag is accepted, even a standard one.
    tag = getattr(event, "tag", None)
    if not tag:
        return
    # ruamel.yaml expands `!!name` to the full `tag:yaml.org,2002:name`, so show it as written.
    written = tag.replace(_YAML_TAG_PREFIX, "!!", 1) if tag.startswith(_YAML_TAG_PREFIX) else tag
    message = (
        f"tags are not allowed in rule files; remove {written} and write the plain value, "
        "in quotes if it must be text"
    )
    raise LimitExceeded(_position(event), "tag", message)


def _alias_shape(
    event: AliasEvent, anchored: dict[str, _Shape], open_collections: list[_Collection]
) -> _Shape:
    name = event.anchor
    if any(collection.anchor == name for collection in open_collections):
        message = (
            f"alias *{name} is inside the node its anchor &{name} marks, "
            "which makes an endless structure; remove the alias"
        )
        raise LimitExceeded(_position(event), "alias", message)

    # An undefined alias counts as one node here, because ruamel.yaml reports it on loading.
    shape = anchored.get(name, _Shape(1, 0))
    if len(open_collections) + shape.height > MAX_DEPTH:
        message = (
            f"nesting too deep after expanding aliases: more than {MAX_DEPTH} levels of "
            "lists and mappings; rule files need no nested aliases, so write the value out"
        )
        raise LimitExceeded(_position(event), "alias", message)
    return shape


def _check_total(event: Event, total: int) -> None:
    if total <= MAX_NODES:
        return
    if isinstance(event, AliasEvent):
        message = (
            f"too many nodes after expanding aliases: more than {MAX_NODES} lists, "
            "mappings and values; rule files need no nested aliases, so write the values out"
        )
        raise LimitExceeded(_position(event), "alias", message)
    message = (
        f"too many nodes: more than {MAX_NODES} lists, mappings and values; "
        "split the rules into several files"
    )
    raise LimitExceeded(_position(event), "file", message)


def _position(event: Event) -> Position:
    mark = event.start_mark
    return Position(mark.line + 1, mark.column + 1)
