"""docs/troubleshooting.md lists every error message the tests produce.

The messages are read from the tests themselves (no import, no ComfyUI): each
``pytest.raises(..., match=PATTERN)`` and each ``"text" in <the error's text>`` assertion gives a
pattern, resolved through string literals, f-strings, ``+``, ``@pytest.mark.parametrize`` and
simple assignments or loops in the test. The page quotes each message once, with example values,
so a pattern matches the page with its numbers and quoted values read as examples.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "troubleshooting.md"
# An expression that holds an error's text: str(e.value), err, done.stderr, answer["error"], …
ERROR_TEXT = re.compile(r"\bstr\(|\berr\b|stderr|error\(|\bmessage\b|\[\"(?:error|details)\"\]")
# Patterns that are no message a user can meet, with why: internal invariants of the engine's
# own calls, and messages of the tests' helpers.
NOT_USER_FACING = {
    r"recorded steps: \[1\]": "AttentionStore.step_maps of a step it never stored",
    "for_grad=True": "the ComfyUI host built without autograd, by the nodes never",
    r"inf in b at step 4 of P2P sampling \(bf16\)": "check_finite's format, with a test's names",
    "2 maps but 3 labels": "the map renderer's own arguments",
    r"6 images for 1 rows × 3 columns": "the sweep renderer's own arguments",
    "as many first as final losses": "the loss-curve renderer's own arguments",
    "expected 2 prompt embeddings, got 1": "sample_sweep's contexts, built by editing.sweep",
    "required input 'vae'": "tests/workflow_api.py, a test helper",
}
ANY = "\0"  # a value the test computes (an f-string's {…}, a name it cannot resolve)


def page_text() -> str:
    """The page as one line: no markdown backticks, whitespace collapsed."""
    return " ".join(PAGE.read_text(encoding="utf-8").replace("`", "").split())


def strings(node: ast.expr | None, scope: dict[str, list[ast.expr]]) -> list[str]:
    """The strings ``node`` can take in the test; ANY stands for a computed part."""
    if isinstance(node, ast.Constant):
        return [node.value] if isinstance(node.value, str) else []
    if isinstance(node, ast.JoinedStr):
        parts = [strings(v, scope) if isinstance(v, ast.Constant) else [ANY] for v in node.values]
        return ["".join(p[0] for p in parts)] if all(len(p) == 1 for p in parts) else []
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return [a + b for a in strings(node.left, scope) for b in strings(node.right, scope)]
    if isinstance(node, ast.Name):
        return [s for v in scope.get(node.id, []) for s in strings(v, {})]
    return []


def bind(target: ast.expr, value: ast.expr, scope: dict[str, list[ast.expr]]) -> None:
    """Record what ``target = value`` (or a loop or parametrize row) gives each name."""
    if isinstance(target, ast.Name):
        scope.setdefault(target.id, []).append(value)
    elif isinstance(target, ast.Tuple) and isinstance(value, (ast.Tuple, ast.List)):
        for t, v in zip(target.elts, value.elts):
            bind(t, v, scope)


def names_of(test: ast.AST) -> dict[str, list[ast.expr]]:
    """The values a test's names take from parametrize, assignments and loops over literals."""
    scope: dict[str, list[ast.expr]] = {}
    for d in getattr(test, "decorator_list", []):
        if (isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "parametrize"
                and isinstance(d.args[1], ast.List)):
            given = d.args[0]  # "a, b" or ("a", "b")
            spelled = (given.value.split(",") if isinstance(given, ast.Constant) else
                       [e.value for e in getattr(given, "elts", []) if isinstance(e, ast.Constant)])
            argnames = [ast.Name(n.strip()) for n in spelled]
            for row in d.args[1].elts:
                if isinstance(row, ast.Call):  # pytest.param(...)
                    row = ast.Tuple(row.args)
                bind(ast.Tuple(argnames) if len(argnames) > 1 else argnames[0], row, scope)
    for node in ast.walk(test):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                bind(target, node.value, scope)
        elif isinstance(node, ast.For) and isinstance(node.iter, (ast.Tuple, ast.List)):
            for value in node.iter.elts:
                bind(node.target, value, scope)
    return scope


def asserted(node: ast.AST) -> ast.expr | None:
    """The text a test asserts an error holds: ``"…" in <error>``, ``<error> == "…"`` (either
    side), ``<error>.startswith("…")``; None for anything else."""
    def error(e: ast.expr) -> bool:
        return bool(ERROR_TEXT.search(ast.unparse(e)))

    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        left, right = node.left, node.comparators[0]
        if isinstance(node.ops[0], ast.In) and error(right):
            return left
        if isinstance(node.ops[0], ast.Eq):
            return left if error(right) else right if error(left) else None
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "startswith" and error(node.func.value) and node.args):
        return node.args[0]
    return None


def messages(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, regex) of every error message asserted in a test module."""
    for test in ast.walk(tree):
        if not isinstance(test, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        scope = names_of(test)
        for node in ast.walk(test):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "raises":
                for kw in node.keywords:
                    if kw.arg == "match":
                        for s in strings(kw.value, scope):
                            yield node.lineno, s.replace(ANY, ".+?")
            elif (text := asserted(node)) is not None:
                for s in strings(text, scope):
                    literal = re.escape(s.removeprefix("error: ").strip())
                    yield node.lineno, literal.replace(re.escape(ANY), ".+?")


# what the page may show with another example value: a file name, a number, a quoted value
EXAMPLES = ((re.compile(r"[\w-]+\\?\.safetensors"), r"\S+"),
            (re.compile(r"'[^']*'"), r"'[^']*'"),
            (re.compile(r"(?<!\\)\b\d+(?:\\?\.\d+)?(?:e\\?[+-]?\d+)?\b"),
             r"\d+(?:\.\d+)?(?:e[+-]?\d+)?"))
QUANTIFIER = re.compile(r"\{\d*,?\d*\}")  # a regex's {m,n}: no example value


def as_example(pattern: str) -> str:
    """``pattern`` with its example values matching any value of their kind."""
    kept = QUANTIFIER.findall(pattern)
    out = QUANTIFIER.sub("\1", pattern)
    for example, anything in EXAMPLES:
        out = example.sub(lambda _, value=anything: value, out)
    return re.sub("\1", lambda _: kept.pop(0), out)


def missing(page: str) -> list[str]:
    """The test messages the page does not list, as 'tests/file.py:line: pattern'."""
    absent = []
    for f in sorted((ROOT / "tests").glob("test_*.py")):
        for line, pattern in messages(ast.parse(f.read_text(encoding="utf-8"))):
            pattern = pattern.removeprefix("^").removesuffix("$")  # the message's ends
            if pattern in NOT_USER_FACING or re.fullmatch(r"[\w\s]{0,12}", pattern):
                continue  # a word or two ("got", "at most") is no message
            try:
                found = re.search(pattern, page) or re.search(as_example(pattern), page)
            except re.error:
                found = pattern in page
            if not found:
                absent.append(f"tests/{f.name}:{line}: {pattern}")
    return absent


def test_the_page_lists_every_error_message_the_tests_produce() -> None:
    absent = missing(page_text())
    assert not absent, "docs/troubleshooting.md lacks:\n" + "\n".join(absent)


def test_the_check_reads_the_tests_messages_and_misses_a_removed_entry() -> None:
    """The check finds messages in the tests (raises, parametrize, in str(e)) and fails once an
    entry the tests need is cut from the page."""
    tree = ast.parse((ROOT / "tests" / "test_files_hardening.py").read_text(encoding="utf-8"))
    found = [p for _, p in messages(tree)]
    assert "is an absolute path" in found and "filename_prefix is empty" in found
    page = page_text()
    entry = "is an absolute path: give a file name inside the output folder"
    assert entry in page and not any("is an absolute path" in m for m in missing(page))
    assert any("is an absolute path" in m for m in missing(page.replace(entry, "")))
