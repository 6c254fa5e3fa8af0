"""YAML of configs, parsed in bounded time and memory.

``yaml.safe_load`` builds no objects but plain data, yet a few hundred bytes can still hurt:
aliases of aliases ("billion laughs") expand to 10^9 nodes in whoever walks the result
(pydantic, a dump), ``&a [*a]`` is a structure that contains itself, deep nesting exhausts the
recursion limit, and YAML 1.1 silently keeps the last of two equal keys or makes ``on:`` a
boolean key. :func:`parse_yaml` refuses each of these in one line (a ConfigError naming the
source and, where it has one, the line), before any of it reaches the config models:

- at most :data:`MAX_BYTES` of text;
- nesting at most :data:`MAX_DEPTH` deep, counted through aliases;
- at most :data:`MAX_NODES` nodes once every alias is expanded, and no alias cycles;
- mapping keys are strings, each at most once per mapping (a ``<<`` merge may still be
  overridden by an explicit key, which is what merges are for).
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from modmoe.config_base import ConfigError

MAX_BYTES = 64 << 10  # configs are a few kB; the pure-Python parser reads 64 kB in ~0.5 s on a busy core
MAX_DEPTH = 32
MAX_NODES = 10_000  # a full config has ~200 values
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _where(node: Node) -> str:
    return f"line {node.start_mark.line + 1}"


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that checks the node graph before constructing it, and mapping keys as it
    constructs them."""

    source = "<yaml>"

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # composition recurses once per nesting level
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(
                    f"config error: {self.source} line {mark.line + 1}: nested deeper than {MAX_DEPTH} levels"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_graph(node, self.source)
        return node

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise ConfigError(
                    f"config error: {self.source} {_where(key_node)}: key {key!r} is of type {type(key).__name__}; "
                    "keys must be strings (quote it)"
                )
            if key in seen:
                raise ConfigError(f"config error: {self.source} {_where(key_node)}: duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_graph(root: Node, source: str) -> None:
    """Expanded size and depth of the node graph (aliases make it a DAG, or a cycle)."""
    sizes: dict[int, tuple[int, int]] = {}  # id -> (expanded nodes, height)
    open_nodes: set[int] = set()

    def visit(node: Node, depth: int) -> tuple[int, int]:
        if id(node) in open_nodes:
            raise ConfigError(f"config error: {source} {_where(node)}: an alias refers to a node that contains it")
        if id(node) not in sizes:
            if depth > MAX_DEPTH:
                raise ConfigError(f"config error: {source} {_where(node)}: nested deeper than {MAX_DEPTH} levels")
            open_nodes.add(id(node))
            total, height = 1, 0
            for child in _children(node):
                size, h = visit(child, depth + 1)
                total, height = total + size, max(height, h + 1)
                if total > MAX_NODES:
                    raise ConfigError(
                        f"config error: {source} {_where(node)}: more than {MAX_NODES} values once aliases are "
                        "expanded (an alias bomb?)"
                    )
            open_nodes.discard(id(node))
            sizes[id(node)] = (total, height)
        size, height = sizes[id(node)]
        if depth + height > MAX_DEPTH:
            raise ConfigError(f"config error: {source} {_where(node)}: nested deeper than {MAX_DEPTH} levels")
        return size, height

    visit(root, 0)


def parse_yaml(text: str, source: str) -> Any:
    """The data of one YAML document, or a one-line ConfigError naming ``source``."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"config error: {source}: {len(text)} characters, more than a config may have ({MAX_BYTES})")
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader already refuses unprintable characters
        loader.source = source
        return loader.get_single_data()
    except ConfigError:
        raise
    except yaml.YAMLError as err:
        raise ConfigError(f"config error: {source} is not valid YAML: {' '.join(str(err).split())[:300]}") from None
    except (ValueError, TypeError, OverflowError) as err:  # a scalar PyYAML cannot build: 30-02 dates, 5000-digit ints
        raise ConfigError(f"config error: {source}: a value cannot be read ({str(err)[:200]})") from None
    except RecursionError:
        raise ConfigError(f"config error: {source}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
