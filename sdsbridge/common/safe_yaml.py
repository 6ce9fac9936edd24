"""YAML parsing that a hostile or careless file cannot turn into a memory or time bomb.

PyYAML's ``safe_load`` runs no code, but it will build whatever the text describes: an alias bomb (a few
lines of anchors, each referring to the previous one ten times) expands into billions of nodes as soon as
something walks it (or, with a long anchored string and fewer aliases, into gigabytes of text as soon as
something prints it), a huge list fills memory, and deep nesting ends in a RecursionError. ``load_yaml``
first streams the parser's events (no tree is built, nesting is not recursive) and stops at the first
bound crossed; only then is the tree constructed, with duplicate mapping keys rejected.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from sdsbridge.common.errors import UserError

MAX_BYTES = 256 << 10
"""Largest YAML text read (256 KiB; a full config is about 4 KiB)."""
MAX_DEPTH = 32
"""Deepest nesting of lists and mappings (a config uses 3)."""
MAX_NODES = 100_000
"""Most values the document may hold with every alias expanded (a full config holds about 200)."""
MAX_EXPANDED_BYTES = 1 << 20
"""Most characters of text (keys and values) the document may hold with every alias expanded (1 MiB): a few
anchored long strings, each aliased many times, stay within MAX_NODES but would print gigabytes in an error."""

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class MalformedYaml(UserError):
    """Text that is not YAML at all (as opposed to YAML beyond the bounds)."""


class _StrictLoader(_Loader):
    """The safe loader, refusing a mapping that repeats a key (PyYAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise UserError(f"duplicate key '{key}' (lines {first} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML) reads a float only with a dot and a signed exponent: `1e-3` and `1.0e3` were strings, and a
# key that takes a number or a schedule refused them. YAML 1.2 reads them as floats; so does this loader.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def _check_bounds(text: str) -> None:
    """Stream the events of ``text``; UserError at the first bound crossed (MAX_DEPTH, MAX_NODES,
    MAX_EXPANDED_BYTES)."""
    sizes: dict[str, tuple[int, int]] = {}  # anchor -> (nodes, bytes) it expands to
    stack: list[list] = []  # open collections: [nodes so far, bytes so far, anchor]
    total = [0, 0]  # nodes, bytes

    def add(nodes: int, size: int) -> None:
        total[0] += nodes
        total[1] += size
        if total[0] > MAX_NODES:
            raise UserError(f"more than {MAX_NODES} values once aliases are expanded; not a config file")
        if total[1] > MAX_EXPANDED_BYTES:
            raise UserError(f"more than {MAX_EXPANDED_BYTES // 1024} KiB of text once aliases are expanded; not a "
                            "config file")
        if stack:
            stack[-1][0] += nodes
            stack[-1][1] += size

    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(stack) >= MAX_DEPTH:
                raise UserError(f"nested deeper than {MAX_DEPTH} levels")
            add(1, 0)
            stack.append([0, 0, event.anchor])
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            nodes, size, anchor = stack.pop()
            if anchor is not None:
                sizes[anchor] = (nodes + 1, size)
            if stack:
                stack[-1][0] += nodes
                stack[-1][1] += size
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                sizes[event.anchor] = (1, len(event.value))
            add(1, len(event.value))
        elif isinstance(event, yaml.AliasEvent):
            add(*sizes.get(event.anchor, (1, 0)))


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)`` within the bounds above and without duplicate keys. UserError (the
    caller prefixes the file or key) for a bound crossed or a duplicate key, MalformedYaml for text that
    does not parse."""
    if len(text) > MAX_BYTES:
        raise UserError(f"larger than {MAX_BYTES // 1024} KiB")
    try:
        _check_bounds(text)
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MalformedYaml(f"{where}malformed YAML: {problem}") from None
