"""What every section of a policy is read with: the diagnostics found so far, and the checks of single
YAML nodes (a mapping's keys, a string, a boolean, an integer, a list of names, a reference to a defined
name). Each check reports what is wrong at the node's own line and column and returns None or nothing,
so that the sections carry on and the file's every problem is reported at once."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

import yaml

from compositor.policy.diagnostics import Diagnostic

STR = "tag:yaml.org,2002:str"
INT = "tag:yaml.org,2002:int"
FLOAT = "tag:yaml.org,2002:float"
BOOL = "tag:yaml.org,2002:bool"
NULL = "tag:yaml.org,2002:null"
MERGE = "tag:yaml.org,2002:merge"

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

Keys = dict[str, tuple[yaml.Node, yaml.Node]]  # key -> (key node, value node)


def where(first: yaml.Node, here: yaml.Node) -> str:
    """Where `first` is, said as briefly as tells it apart from `here`."""
    line = first.start_mark.line + 1
    if line == here.start_mark.line + 1:
        return f"line {line}, column {first.start_mark.column + 1}"
    return f"line {line}"


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


class Reader:
    """The diagnostics of one policy file, and the node checks that add to them. The sections share
    one reader, so their diagnostics end up in one list, sorted by place when the file is read."""

    def __init__(self, source: str):
        self.source = source
        self.errors: list[Diagnostic] = []
        self.warnings: list[Diagnostic] = []
        self.loader: yaml.SafeLoader | None = None

    # -- reporting

    def error(self, node: yaml.Node | None, message: str, hint: str | None = None) -> None:
        line, col = (node.start_mark.line + 1, node.start_mark.column + 1) if node is not None else (1, 1)
        self.error_at(line, col, message, hint)

    def error_at(self, line: int, column: int, message: str, hint: str | None = None) -> None:
        """An error with no node to point at (YAML that does not parse): at the place YAML names."""
        self.errors.append(Diagnostic(self.source, line, column, message, hint))

    def warn(self, node: yaml.Node, message: str, hint: str | None = None) -> None:
        self.warnings.append(Diagnostic(self.source, node.start_mark.line + 1, node.start_mark.column + 1,
                                        message, hint, warning=True))

    # -- node helpers

    def describe(self, node: yaml.Node) -> str:
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        if node.tag == NULL:
            return "nothing"
        if node.tag == BOOL:
            return f"the boolean `{node.value}`"
        if node.tag in (INT, FLOAT):
            return f"the number `{node.value}`"
        return f'the string "{node.value}"'

    def int_value(self, node: yaml.Node) -> int | None:
        """The integer a scalar node holds (YAML 1.1: 0x1F, 0o17, 1_000), or None."""
        if not isinstance(node, yaml.ScalarNode) or node.tag != INT:
            return None
        assert self.loader is not None
        try:
            return int(self.loader.construct_object(node, deep=True))
        except (ValueError, TypeError, yaml.YAMLError):  # `!!int abc`
            return None

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> Keys:
        """Check a mapping's keys; return key -> (key node, value node) for the allowed ones."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{what} must be a mapping, got {self.describe(node)}")
            return {}
        self.merge(node)
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode) or knode.tag not in (STR, INT):
                self.error(knode, f"keys in {what} must be names, got {self.describe(knode)}")
                continue
            key = str(knode.value)
            if key in out:
                self.error(knode, f"duplicate key `{key}` in {what}",
                           f"first given at {where(out[key][0], knode)}")
                continue
            if allowed and key not in allowed:
                hint = did_you_mean(key, allowed) or "expected one of: " + ", ".join(allowed)
                self.error(knode, f"unknown key `{key}` in {what}", hint)
                continue
            out[key] = (knode, vnode)
        return out

    def merge(self, node: yaml.MappingNode) -> None:
        """Resolve `<<: *anchor` merge keys in place: keys given in the mapping itself win over merged
        ones, as YAML says, and are not reported as duplicates of them."""
        if not any(k.tag == MERGE for k, _ in node.value):
            return
        explicit = {k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode) and k.tag != MERGE}
        own = {id(k) for k, _ in node.value}
        assert self.loader is not None
        try:
            self.loader.flatten_mapping(node)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            self.error_at(line, col, f"YAML merge: {exc.problem}")
            node.value = [(k, v) for k, v in node.value if k.tag != MERGE]
            return
        seen: set[str] = set()
        kept = []
        for k, v in node.value:
            if id(k) not in own and isinstance(k, yaml.ScalarNode):
                if k.value in explicit or k.value in seen:
                    continue
                seen.add(k.value)
            kept.append((k, v))
        node.value = kept

    def named_entries(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """A `name: {...}` section: returns (name, key node, value node), checking the names."""
        entries = []
        for key, (knode, vnode) in self.mapping(node, f"`{what}`", ()).items():
            if not NAME.match(key):
                self.error(knode, f"`{key}` is not a valid name",
                           "use letters, digits, `_`, `-` and `.`, not starting with `-` or `.`")
                continue
            entries.append((key, knode, vnode))
        return entries

    # -- values

    def string(self, node: yaml.Node, what: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != STR:
            self.error(node, f"{what} must be a string, got {self.describe(node)}")
            return None
        value: str = node.value
        if value == "":
            self.error(node, f"{what} must not be empty")
            return None
        return value

    def boolean(self, node: yaml.Node, what: str) -> bool | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != BOOL:
            self.error(node, f"{what} must be true or false, got {self.describe(node)}")
            return None
        return node.value.lower() in ("true", "yes", "on")

    def integer(self, node: yaml.Node, what: str, lo: int, hi: int) -> int | None:
        v = self.int_value(node)
        if v is None:
            self.error(node, f"{what} must be an integer, got {self.describe(node)}")
            return None
        if not lo <= v <= hi:
            self.error(node, f"{what} must be between {lo} and {hi}, got {v}")
            return None
        return v

    def names(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node]]:
        """A name or a list of names."""
        if isinstance(node, yaml.ScalarNode) and node.tag == STR:
            return [(node.value, node)]
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, f"{what} must be a name or a list of names, got {self.describe(node)}")
            return []
        out: list[tuple[str, yaml.Node]] = []
        for item in node.value:
            if isinstance(item, yaml.ScalarNode) and item.tag == STR and item.value:
                out.append((item.value, item))
            else:
                self.error(item, f"{what} must list names, got {self.describe(item)}")
        return out

    def reference(self, name: str, node: yaml.Node, kind: str, defined: Iterable[str]) -> bool:
        defined = list(defined)
        if name in defined:
            return True
        hint = did_you_mean(name, defined)
        if hint is None:
            hint = (f"{kind}s defined: " + ", ".join(f"`{d}`" for d in defined)) if defined \
                else f"no {kind}s are defined"
        self.error(node, f"undefined {kind} `{name}`", hint)
        return False
