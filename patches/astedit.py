"""Syntax-tree helpers for symbol-based source edits that keep every untouched byte.

Responsibilities: map `ast` node positions (UTF-8 byte columns) to text offsets; find calls with their
enclosing statement and function; recognise existing `# hardening:<ID> begin/end` blocks; turn a set of
call-level edits into one marked block per statement; apply non-overlapping edits to the text.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

HELPER_ALIAS = "_fluxtrain_hardening"
HELPER_IMPORT = f"from library import fluxtrain_hardening as {HELPER_ALIAS}"
_MARKER = re.compile(r"^[ \t]*# hardening:(?P<id>[A-Za-z0-9_]+) (?P<kind>begin|end)\b")


class Unsupported(Exception):
    """The target exists but sits in a shape this tool will not edit safely (reported as drift)."""


class Drift(Exception):
    """A target file exists but the expected symbol or call shape is not in it."""

    def __init__(self, relpath: str, symbol: str, detail: str):
        super().__init__(f"{relpath}: {symbol}: {detail}")
        self.relpath, self.symbol, self.detail = relpath, symbol, detail


@dataclass(frozen=True)
class Edit:
    start: int
    end: int
    text: str
    rank: int = 2  # order of edits at the same offset: end markers (0), begin blocks (1), replacements (2)


@dataclass
class Site:
    """One call to harden: where it is, what it is called in, and the edits it needs (empty: already fine)."""

    call: ast.Call
    stmt: ast.stmt
    symbol: str
    edits: list = field(default_factory=list)
    prelude: list = field(default_factory=list)  # extra statements placed before the statement
    patched: bool = False


class Source:
    """A parsed Python file with offset arithmetic and call/statement/function lookups."""

    def __init__(self, text: str):
        self.text = text
        self.tree = ast.parse(text)
        self.newline = "\r\n" if "\r\n" in text else "\n"
        self.line_starts = [0]
        for i, ch in enumerate(text):
            if ch == "\n":
                self.line_starts.append(i + 1)
        self._parents: dict = {}
        self._ranges: dict = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self._parents[child] = node

    # --- positions -------------------------------------------------------------------------------
    def line_text(self, lineno: int) -> str:
        start = self.line_starts[lineno - 1]
        end = self.line_starts[lineno] if lineno < len(self.line_starts) else len(self.text)
        return self.text[start:end]

    def offset(self, lineno: int, col_bytes: int) -> int:
        # ast columns count UTF-8 bytes; upstream lines hold Japanese text, so convert to characters.
        line = self.line_text(lineno)
        return self.line_starts[lineno - 1] + len(line.encode("utf-8")[:col_bytes].decode("utf-8", "replace"))

    def start(self, node) -> int:
        return self.offset(node.lineno, node.col_offset)

    def end(self, node) -> int:
        return self.offset(node.end_lineno, node.end_col_offset)

    def segment(self, node) -> str:
        return self.text[self.start(node) : self.end(node)]

    def after_open_paren(self, call: ast.Call) -> int:
        pos = self.text.index("(", self.end(call.func))
        return pos + 1

    # --- structure -------------------------------------------------------------------------------
    def parent(self, node):
        return self._parents.get(node)

    def enclosing_stmt(self, node) -> ast.stmt:
        cur = self.parent(node)
        while cur is not None and not isinstance(cur, ast.stmt):
            cur = self.parent(cur)
        return cur

    def enclosing_function(self, node):
        cur = self.parent(node)
        while cur is not None and not isinstance(cur, (ast.FunctionDef, ast.AsyncFunctionDef)):
            cur = self.parent(cur)
        return cur

    def qualname(self, node) -> str:
        names = []
        cur = self.parent(node)
        while cur is not None:
            if isinstance(cur, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.append(cur.name)
            cur = self.parent(cur)
        return ".".join(reversed(names)) or "<module>"

    def functions(self, name: str) -> list:
        return [
            n for n in ast.walk(self.tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name
        ]

    def calls(self, within=None):
        return [n for n in ast.walk(within or self.tree) if isinstance(n, ast.Call)]

    def marker_ranges(self, patch_id: str) -> list:
        """(begin_line, end_line) of every `# hardening:<patch_id> begin/end` block, 1-based."""
        if patch_id in self._ranges:
            return self._ranges[patch_id]
        ranges, open_at = [], None
        for lineno in range(1, len(self.line_starts) + 1):
            m = _MARKER.match(self.line_text(lineno))
            if not m or m.group("id") != patch_id:
                continue
            if m.group("kind") == "begin":
                open_at = lineno
            elif open_at is not None:
                ranges.append((open_at, lineno))
                open_at = None
        self._ranges[patch_id] = ranges
        return ranges

    def in_marked_block(self, node, patch_id: str) -> bool:
        return any(b < node.lineno < e for b, e in self.marker_ranges(patch_id))


def parses(path) -> bool:
    """True when the file is UTF-8 Python this interpreter can parse (used to skip stray discovered files)."""
    try:
        ast.parse(path.read_bytes().decode("utf-8-sig"))
    except (SyntaxError, ValueError, OSError):  # UnicodeDecodeError is a ValueError
        return False
    return True


def dotted_name(node) -> str | None:
    """'torch.utils.data.DataLoader' for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def function_params(func) -> list:
    args = func.args
    return [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]


def _indent_of(src: Source, lineno: int) -> str:
    line = src.line_text(lineno)
    return line[: len(line) - len(line.lstrip(" \t"))]


def _header_end_line(src: Source, stmt: ast.stmt) -> int:
    """Line after which the end marker goes: the statement's last line, or for a compound one its header."""
    body = getattr(stmt, "body", None)
    if not body:
        return stmt.end_lineno
    if not isinstance(stmt, (ast.If, ast.While, ast.For, ast.AsyncFor, ast.With, ast.AsyncWith)):
        raise Unsupported(f"a call inside a {type(stmt).__name__} header")
    if body[0].lineno == stmt.lineno:
        raise Unsupported("a one-line compound statement")
    return body[0].lineno - 1


def block_edits(src: Source, stmt: ast.stmt, patch_id: str, fix: str, sites: list) -> list:
    """Edits that wrap `stmt` in a marked block and apply the sites' call-level edits inside it."""
    line_start = src.line_starts[stmt.lineno - 1]
    if src.text[line_start : src.start(stmt)].strip():
        raise Unsupported("a statement that shares its first line with other code")
    if src.line_text(stmt.lineno).lstrip().startswith("elif"):
        raise Unsupported("an elif condition")
    last_line = _header_end_line(src, stmt)
    if last_line == stmt.end_lineno:
        line_end = src.line_starts[last_line] if last_line < len(src.line_starts) else len(src.text)
        rest = src.text[src.end(stmt) : line_end]
        if rest.strip() and not rest.strip().startswith("#"):
            raise Unsupported("a statement followed by more code on its last line")
    nl, indent = src.newline, _indent_of(src, stmt.lineno)
    lines = [f"# hardening:{patch_id} begin", f"# FIX: {fix}", HELPER_IMPORT]
    for site in sites:
        lines.extend(site.prelude)
    begin = "".join(f"{indent}{line}{nl}" for line in lines)
    end_at = src.line_starts[last_line] if last_line < len(src.line_starts) else len(src.text)
    end_text = f"{indent}# hardening:{patch_id} end{nl}"
    if end_at == len(src.text) and not src.text.endswith("\n"):
        end_text = nl + end_text
    edits = [Edit(line_start, line_start, begin, rank=1), Edit(end_at, end_at, end_text, rank=0)]
    for site in sites:
        edits.extend(site.edits)
    return edits


def apply_edits(text: str, edits: list) -> str:
    """Apply non-overlapping edits given as absolute offsets into `text`."""
    out, pos = [], 0
    for edit in sorted(edits, key=lambda e: (e.start, e.rank, e.end)):
        if edit.start < pos:
            raise Unsupported("two edits overlap")
        out.append(text[pos : edit.start])
        out.append(edit.text)
        pos = edit.end
    out.append(text[pos:])
    return "".join(out)


def replace_callee(src: Source, call: ast.Call, new_func: str, leading_args: list) -> list:
    """Edits turning `recv.meth(a, b)` into `new_func(<leading_args>, a, b)`; argument text is kept verbatim."""
    edits = [Edit(src.start(call.func), src.end(call.func), new_func)]
    if leading_args:
        has_args = bool(call.args or call.keywords)
        at = src.after_open_paren(call)
        line_break = src.text[at:].split("\n", 1)[0].strip() == ""  # arguments start on the next line
        sep = ("," if line_break else ", ") if has_args else ""
        edits.append(Edit(at, at, ", ".join(leading_args) + sep))
    return edits
