"""AST-level bugs in one function: where they can go, and the source text of each.

A unit is a function (or method) not nested in another function; nested functions, lambdas and
comprehensions belong to the unit around them. units(source) lists a file's units and sites(unit)
every mutation that fits its body, in a fixed order (a pre-order walk of the body, field order),
each a Site (kind, node index in that walk, variant). materialize(source, unit, site) writes the
mutated file: text edits inside the function's lines only (the rest of the file stays
byte-identical), token-level where it can (an operator swapped, operands exchanged, a line
dropped), else the changed expression rewritten by ast.unparse; the result is accepted only if it
parses to exactly the mutated AST (ast.dump of the function equal), else the site is skipped.

Kinds (KINDS):
  flip_comparison    a comparison negated (< to >=, == to !=, in to not in, is to is not), `and`
                     to `or` and back, a `not` dropped, an `if` test negated
  weaken_comparison  a strict comparison made non-strict or back (< to <=, > to >=)
  off_by_one         a slice bound, a constant index or a range() argument moved by one
  swap_operands      the operands of a non-commutative operator (-, /, //, %, **, <<, >>, <, ...)
                     or the first two positional arguments of a call exchanged
  drop_condition     one operand of `and`/`or` dropped, an `if` unwrapped (its body always runs),
                     a conditional expression replaced by one of its branches
  drop_statement     one statement dropped (an assignment, a call, a raise, a guard `if`, ...)
  wrong_constant     an integer constant changed by one, True/False swapped
  wrong_return       a return value replaced by None (or a returned True/False negated)
Docstrings, decorators, default values, annotations and f-strings are never touched.
"""

from __future__ import annotations

import ast
import copy
import re
from dataclasses import dataclass
from pathlib import Path

KINDS = ("flip_comparison", "weaken_comparison", "off_by_one", "swap_operands", "drop_condition",
         "drop_statement", "wrong_constant", "wrong_return")

NEGATED = {ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt, ast.Eq: ast.NotEq,
           ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
WEAKENED = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt}
OP_TEXT = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
           ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}
OP_PATTERN = {ast.Lt: r"(?<![<>=!])<(?![<=])", ast.LtE: r"<=", ast.Gt: r"(?<![<>=!-])>(?![>=])", ast.GtE: r">=",
              ast.Eq: r"==", ast.NotEq: r"!=", ast.Is: r"\bis\b(?!\s+not\b)", ast.IsNot: r"\bis\s+not\b",
              ast.In: r"(?<!not )\bin\b", ast.NotIn: r"\bnot\s+in\b"}
NONCOMMUTATIVE = {ast.Sub: "-", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**",
                  ast.LShift: "<<", ast.RShift: ">>", ast.MatMult: "@"}
# Calls whose first two arguments commute, or that a swap only turns into a TypeError at once.
SYMMETRIC_CALLS = {"max", "min", "set", "frozenset", "print", "isinstance", "issubclass", "hasattr",
                   "getattr", "setattr", "super", "zip", "dict", "sorted", "format"}
DROPPABLE = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Raise, ast.If, ast.Delete, ast.Continue,
             ast.Break)
MAX_DROPPED_LINES = 8


@dataclass(frozen=True)
class Unit:
    """A function that bugs can go into: file (relative path), dotted module, qualified name, the
    line of `def`, and its first (decorators included) and last line."""

    file: str
    module: str
    qualname: str
    lineno: int
    start: int
    end: int

    @property
    def key(self) -> str:
        return f"{self.module}:{self.qualname}:{self.lineno}"


@dataclass(frozen=True)
class Site:
    """One mutation: its kind, the index of the node it changes in the unit's walk, a variant."""

    kind: str
    index: int
    variant: str


@dataclass(frozen=True)
class Mutation:
    """A materialised site: the mutated file text, a one-line description, the line it is on."""

    site: Site
    text: str
    label: str
    line: int


def module_name(file: str, roots: tuple[str, ...] = ()) -> str:
    """Dotted module of a repository-relative path, under the first root (e.g. "src") it is in."""
    parts = list(Path(file).with_suffix("").parts)
    for root in roots:
        rp = [p for p in Path(root).parts if p != "."]
        if rp and parts[: len(rp)] == rp:
            parts = parts[len(rp):]
            break
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def units(source: str, file: str, module: str) -> list[Unit]:
    """The file's outermost functions and methods, in source order."""
    tree = ast.parse(source)
    lines = source.splitlines()
    out: list[Unit] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                first = lines[start - 1]
                col = child.col_offset if start == child.lineno else child.decorator_list[0].col_offset - 1
                if first[:col].strip() == "" and child.end_lineno:
                    out.append(Unit(file, module, prefix + child.name, child.lineno, start, child.end_lineno))
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            elif not isinstance(child, (ast.Lambda, ast.expr)):
                visit(child, prefix)  # if/try/with blocks at module or class level

    visit(tree, "")
    return out


# ---------------------------------------------------------------------------------------------
# The walk


def _walk(func: ast.AST):
    """(node, parent, field, index-in-list or None) in pre-order over the function's body: no
    docstring, decorators, defaults, annotations or f-strings."""
    body = list(func.body)
    start = 1 if body and _is_docstring(body[0]) else 0

    def visit(node, parent, fname, idx):
        yield node, parent, fname, idx
        if isinstance(node, ast.JoinedStr):
            return
        for name, value in ast.iter_fields(node):
            if name in ("annotation", "returns", "decorator_list", "type_comment"):
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and name == "args":
                continue
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, ast.AST):
                        yield from visit(item, node, name, i)
            elif isinstance(value, ast.AST):
                yield from visit(value, node, name, None)

    for i in range(start, len(body)):
        yield from visit(body[i], func, "body", i)


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _int(node: ast.AST) -> int | None:
    """The value of an int literal, or of minus one."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
            and type(node.operand.value) is int:
        return -node.operand.value
    return None


def _parse_unit(source: str, unit: Unit) -> tuple[str, ast.AST, int, int, int]:
    """(wrapped text, function node, start and end char offsets of the unit's lines in source,
    length of the wrapper prefix).
    The unit's lines are parsed on their own, under `if 1:` when indented."""
    line_starts = [0]
    for m in re.finditer("\n", source):
        line_starts.append(m.end())
    a = line_starts[unit.start - 1]
    b = line_starts[unit.end] if unit.end < len(line_starts) else len(source)
    segment = source[a:b]
    if not segment.endswith("\n"):
        segment += "\n"
    indented = segment[:1] in (" ", "\t")
    wrapped = ("if 1:\n" + segment) if indented else segment
    tree = ast.parse(wrapped)
    func = tree.body[0].body[0] if indented else tree.body[0]
    if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise SyntaxError("unit does not start with its function")
    return wrapped, func, a, b, len(wrapped) - len(segment)


def sites(source: str, unit: Unit) -> list[Site]:
    """Every mutation that fits the unit's body, in walk order."""
    try:
        _, func, _, _, _ = _parse_unit(source, unit)
    except SyntaxError:
        return []
    out: list[Site] = []
    handled: set[int] = set()  # ids of constants that off_by_one already moves
    nodes = list(_walk(func))
    for i, (node, parent, fname, idx) in enumerate(nodes):
        add = lambda kind, variant, i=i: out.append(Site(kind, i, variant))  # noqa: E731
        if isinstance(node, ast.Compare):
            for j, op in enumerate(node.ops):
                if type(op) in NEGATED:
                    add("flip_comparison", f"op{j}")
                if type(op) in WEAKENED:
                    add("weaken_comparison", f"op{j}")
            if len(node.ops) == 1 and type(node.ops[0]) in WEAKENED:
                add("swap_operands", "sides")
        elif isinstance(node, ast.BinOp) and type(node.op) in NONCOMMUTATIVE:
            add("swap_operands", "binop")
        elif isinstance(node, ast.BoolOp):
            add("flip_comparison", "boolop")
            for k in range(len(node.values)):
                add("drop_condition", f"drop{k}")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            add("flip_comparison", "not")
        elif isinstance(node, ast.IfExp):
            add("drop_condition", "body")
            add("drop_condition", "orelse")
        elif isinstance(node, ast.Subscript):
            sl = node.slice
            if isinstance(sl, ast.Slice):
                for bound in ("lower", "upper"):
                    b = getattr(sl, bound)
                    if b is not None:
                        handled.add(id(b))
                        if isinstance(b, ast.UnaryOp):
                            handled.add(id(b.operand))
                        add("off_by_one", f"{bound}+1")
                        if _int(b) != 0 and _int(b) != -1:
                            add("off_by_one", f"{bound}-1")
            elif _int(sl) is not None:
                handled.add(id(sl))
                if isinstance(sl, ast.UnaryOp):
                    handled.add(id(sl.operand))
                add("off_by_one", "index+1")
                if _int(sl) not in (0, -1):
                    add("off_by_one", "index-1")
        elif isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            positional = [a for a in node.args if not isinstance(a, ast.Starred)]
            if name == "range" and len(node.args) == len(positional) and 1 <= len(positional) <= 3:
                for k in range(min(2, len(positional))):
                    handled.add(id(positional[k]))
                    add("off_by_one", f"arg{k}+1")
                    if _int(positional[k]) != 0:
                        add("off_by_one", f"arg{k}-1")
            elif len(node.args) >= 2 and len(positional) == len(node.args) and name not in SYMMETRIC_CALLS:
                add("swap_operands", "args")
        elif isinstance(node, ast.Constant) and id(node) not in handled:
            if type(node.value) is bool:
                add("wrong_constant", "not")
            elif type(node.value) is int and not (isinstance(parent, ast.UnaryOp)):
                add("wrong_constant", "+1")
                if node.value >= 1:
                    add("wrong_constant", "-1")
        elif isinstance(node, ast.Return) and node.value is not None:
            v = node.value
            if isinstance(v, ast.Constant) and type(v.value) is bool:
                add("wrong_return", "not")
            elif not (isinstance(v, ast.Constant) and v.value is None):
                add("wrong_return", "none")
        if isinstance(node, ast.If) and isinstance(parent, ast.AST) and idx is not None:
            if not isinstance(node.test, (ast.Compare, ast.BoolOp)) and not (
                    isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not)):
                add("flip_comparison", "if")
            if not node.orelse and not _is_elif(parent, fname):
                add("drop_condition", "unwrap")
        if isinstance(node, ast.stmt) and idx is not None and isinstance(node, DROPPABLE) and \
                not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) and \
                node.end_lineno - node.lineno < MAX_DROPPED_LINES and not _is_elif(parent, fname):
            add("drop_statement", "drop")
    return out


def _is_elif(parent: ast.AST, fname: str) -> bool:
    return isinstance(parent, ast.If) and fname == "orelse" and len(parent.orelse) == 1 and \
        isinstance(parent.orelse[0], ast.If)


# ---------------------------------------------------------------------------------------------
# Applying a site


def _one(value: int) -> ast.expr:
    return ast.Constant(value) if value >= 0 else ast.UnaryOp(ast.USub(), ast.Constant(-value))


def _shift(node: ast.expr, by: int) -> ast.expr:
    v = _int(node)
    if v is not None:
        return _one(v + by)
    return ast.BinOp(node, ast.Add() if by > 0 else ast.Sub(), ast.Constant(abs(by)))


def _transform(nodes, site: Site) -> str | None:
    """Mutate the copied function whose walk is `nodes` in place; a label, or None if impossible."""
    node, parent, fname, idx = nodes[site.index]
    kind, v = site.kind, site.variant

    def replace(new):
        if idx is None:
            setattr(parent, fname, new)
        else:
            getattr(parent, fname)[idx] = new

    if kind in ("flip_comparison", "weaken_comparison") and v.startswith("op"):
        j = int(v[2:])
        old = type(node.ops[j])
        new = (NEGATED if kind == "flip_comparison" else WEAKENED)[old]
        node.ops[j] = new()
        return f"'{OP_TEXT[old]}' -> '{OP_TEXT[new]}'"
    if kind == "swap_operands" and v == "sides":
        node.left, node.comparators[0] = node.comparators[0], node.left
        return "comparison sides swapped"
    if kind == "swap_operands" and v == "binop":
        node.left, node.right = node.right, node.left
        return f"operands of '{NONCOMMUTATIVE[type(node.op)]}' swapped"
    if kind == "swap_operands" and v == "args":
        node.args[0], node.args[1] = node.args[1], node.args[0]
        return "first two call arguments swapped"
    if kind == "flip_comparison" and v == "boolop":
        old = "and" if isinstance(node.op, ast.And) else "or"
        node.op = ast.Or() if old == "and" else ast.And()
        return f"'{old}' -> '{'or' if old == 'and' else 'and'}'"
    if kind == "drop_condition" and v.startswith("drop"):
        k = int(v[4:])
        del node.values[k]
        if len(node.values) == 1:
            replace(node.values[0])
        return f"operand {k + 1} of a boolean expression dropped"
    if kind == "flip_comparison" and v == "not":
        replace(node.operand)
        return "'not' dropped"
    if kind == "flip_comparison" and v == "if":
        node.test = ast.UnaryOp(ast.Not(), node.test)
        return "if-condition negated"
    if kind == "drop_condition" and v in ("body", "orelse"):
        replace(getattr(node, v))
        return f"conditional expression replaced by its {'if' if v == 'body' else 'else'} branch"
    if kind == "drop_condition" and v == "unwrap":
        body = getattr(parent, fname)
        body[idx: idx + 1] = node.body
        return "if-statement unwrapped (its body always runs)"
    if kind == "off_by_one":
        what, by = v[:-2], (1 if v.endswith("+1") else -1)
        if what in ("lower", "upper"):
            setattr(node.slice, what, _shift(getattr(node.slice, what), by))
        elif what == "index":
            node.slice = _shift(node.slice, by)
        else:
            k = int(what[3:])
            node.args[k] = _shift(node.args[k], by)
        return f"{what} {'+' if by > 0 else '-'}1"
    if kind == "wrong_constant":
        if v == "not":
            node.value = not node.value
            return f"{not node.value} -> {node.value}"
        old = node.value
        node.value = old + (1 if v == "+1" else -1)
        return f"{old} -> {node.value}"
    if kind == "wrong_return":
        old = ast.unparse(node.value)
        node.value = ast.Constant(None) if v == "none" else ast.Constant(not node.value.value)
        return f"return {old[:40]} -> return {node.value.value}"
    if kind == "drop_statement":
        body = getattr(parent, fname)
        del body[idx]
        if not body:
            body.append(ast.Pass())
        return "statement dropped"
    return None


class _Text:
    """Char offsets in a text from ast's (line, utf-8 byte column) positions."""

    def __init__(self, text: str):
        self.text = text
        self.lines = text.splitlines(keepends=True)
        self.starts = [0]
        for ln in self.lines:
            self.starts.append(self.starts[-1] + len(ln))

    def off(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1]
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:col].decode("utf-8", "replace"))

    def span(self, node: ast.AST) -> tuple[int, int]:
        return self.off(node.lineno, node.col_offset), self.off(node.end_lineno, node.end_col_offset)

    def seg(self, node: ast.AST) -> str:
        a, b = self.span(node)
        return self.text[a:b]

    def line_span(self, node: ast.AST) -> tuple[int, int] | None:
        """The whole lines of a statement, if nothing else is on them (a comment may follow)."""
        a, b = self.span(node)
        la, lb = self.starts[node.lineno - 1], self.starts[node.end_lineno]
        if self.text[la:a].strip() or (self.text[b:lb].strip() and not self.text[b:lb].strip().startswith("#")):
            return None
        return la, lb


def _edits(t: _Text, nodes, site: Site, new_nodes) -> list[list[tuple[int, int, str]]]:
    """Candidate text edits (a list of alternatives, tried in order) for a site."""
    node, parent, fname, idx = nodes[site.index]
    new_node = new_nodes[site.index][0]
    kind, v = site.kind, site.variant
    alts: list[list[tuple[int, int, str]]] = []

    def between(a_node, b_node):
        return t.span(a_node)[1], t.span(b_node)[0]

    if kind in ("flip_comparison", "weaken_comparison") and v.startswith("op"):
        j = int(v[2:])
        a, b = between(node.left if j == 0 else node.comparators[j - 1], node.comparators[j])
        m = re.search(OP_PATTERN[type(node.ops[j])], t.text[a:b])
        if m:
            alts.append([(a + m.start(), a + m.end(), OP_TEXT[type(new_node.ops[j])])])
    elif kind == "swap_operands" and v in ("sides", "binop", "args"):
        x, y = (node.left, node.comparators[0]) if v == "sides" else (node.left, node.right) if v == "binop" \
            else (node.args[0], node.args[1])
        (xa, xb), (ya, yb) = t.span(x), t.span(y)
        alts.append([(xa, xb, t.text[ya:yb]), (ya, yb, t.text[xa:xb])])
    elif kind == "flip_comparison" and v == "boolop":
        old, new = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
        edit = []
        for p, q in zip(node.values, node.values[1:]):
            a, b = between(p, q)
            m = re.search(rf"\b{old}\b", t.text[a:b])
            if not m:
                break
            edit.append((a + m.start(), a + m.end(), new))
        else:
            alts.append(edit)
    elif kind == "drop_condition" and v.startswith("drop"):
        k = int(v[4:])
        vals = node.values
        if k == 0:
            alts.append([(t.span(vals[0])[0], t.span(vals[1])[0], "")])
        else:
            alts.append([(t.span(vals[k - 1])[1], t.span(vals[k])[1], "")])
    elif kind == "flip_comparison" and v == "not":
        a, _ = t.span(node)
        m = re.match(r"not\s*", t.text[a:])
        if m:
            alts.append([(a, a + m.end(), "")])
    elif kind == "flip_comparison" and v == "if":
        a, b = t.span(node.test)
        simple = isinstance(node.test, (ast.Name, ast.Attribute, ast.Call, ast.Subscript, ast.Constant))
        alts.append([(a, b, ("not " + t.text[a:b]) if simple else f"not ({t.text[a:b]})")])
    elif kind == "drop_condition" and v in ("body", "orelse"):
        a, b = t.span(node)
        alts.append([(a, b, t.seg(getattr(node, v)))])
    elif kind == "drop_condition" and v == "unwrap":
        head = t.line_span(node)
        if head and node.body[0].lineno > node.lineno:
            la, _ = head
        else:
            return []
        indent = len(t.lines[node.lineno - 1]) - len(t.lines[node.lineno - 1].lstrip())
        b_indent = len(t.lines[node.body[0].lineno - 1]) - len(t.lines[node.body[0].lineno - 1].lstrip())
        delta = b_indent - indent
        out = []
        for ln in t.lines[node.body[0].lineno - 1: node.end_lineno]:
            out.append(ln[delta:] if ln[:delta].strip() == "" else ln)
        alts.append([(la, t.starts[node.end_lineno], "".join(out))])
    elif kind == "off_by_one":
        what = v[:-2]
        target = getattr(node.slice, what) if what in ("lower", "upper") else node.slice if what == "index" \
            else node.args[int(what[3:])]
        new_target = getattr(new_node.slice, what) if what in ("lower", "upper") else new_node.slice \
            if what == "index" else new_node.args[int(what[3:])]
        a, b = t.span(target)
        if _int(target) is not None:
            alts.append([(a, b, ast.unparse(new_target))])
        else:
            sign = " + 1" if v.endswith("+1") else " - 1"
            alts.append([(a, b, t.text[a:b] + sign)])
            alts.append([(a, b, f"({t.text[a:b]}){sign}")])
    elif kind == "wrong_constant":
        a, b = t.span(node)
        alts.append([(a, b, repr(new_node.value))])
    elif kind == "wrong_return":
        a, b = t.span(node.value)
        alts.append([(a, b, repr(new_node.value.value))])
    elif kind == "drop_statement":
        span = t.line_span(node)
        if span:
            siblings = getattr(parent, fname)
            if len(siblings) == 1:
                line = t.lines[node.lineno - 1]
                alts.append([(span[0], span[1], line[: len(line) - len(line.lstrip())] + "pass\n")])
            else:
                alts.append([(span[0], span[1], "")])
    # Fallback for an expression: the expression now in its place, rewritten bare, then in parentheses.
    if isinstance(node, ast.expr):
        new_parent = new_nodes[site.index][1]
        current = getattr(new_parent, fname)
        changed = current[idx] if idx is not None else current
        a, b = t.span(node)
        alts.append([(a, b, ast.unparse(changed))])
        alts.append([(a, b, "(" + ast.unparse(changed) + ")")])
    return alts


def _apply(text: str, edits: list[tuple[int, int, str]]) -> str:
    for a, b, s in sorted(edits, key=lambda e: e[0], reverse=True):
        text = text[:a] + s + text[b:]
    return text


def materialize(source: str, unit: Unit, site: Site) -> Mutation | None:
    """The file with the site's bug, or None if it cannot be written so that the function parses
    to exactly the mutated AST."""
    try:
        wrapped, func, a, b, prefix = _parse_unit(source, unit)
    except SyntaxError:
        return None
    nodes = list(_walk(func))
    if site.index >= len(nodes):
        return None
    mutated = copy.deepcopy(func)
    new_nodes = list(_walk(mutated))
    label = _transform(new_nodes, site)
    if label is None:
        return None
    want = ast.dump(mutated)
    if want == ast.dump(func):
        return None
    t = _Text(wrapped)
    for edits in _edits(t, nodes, site, new_nodes):
        new = _apply(wrapped, edits)
        try:
            tree = ast.parse(new)
        except SyntaxError:
            continue
        got = tree.body[0].body[0] if prefix else tree.body[0]
        if ast.dump(got) == want:
            segment = new[prefix:]
            if not source[a:b].endswith("\n") and segment.endswith("\n"):
                segment = segment[:-1]
            line = nodes[site.index][0].lineno - (1 if prefix else 0) + unit.start - 1
            return Mutation(site, source[:a] + segment + source[b:], label, line)
    return None
