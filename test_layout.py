"""The layout of the two modules (DESIGN.md, "Layout"): sections in layers, and nothing
in a layer names what a later one defines.

``microagent.py`` is read as its banner sections (a title between two ``# ====`` lines).
The runtime (declarations ... mocks) may name its own definitions in any order, but no
top-level definition of it names one of the launcher, the tooling or the command line;
after the runtime, a section names only what earlier sections define, so no two of them
name each other. Names inside type annotations do not count: they are never evaluated
(``from __future__ import annotations``)."""
from __future__ import annotations

import ast
import bisect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
BANNER = '# ' + '=' * 85
RUNTIME = ('Declarations', 'Decorators', 'Agent', 'Tracing', 'Handler times', 'Bus', 'Broker',
           'Timers', 'Memory backends', 'Mocks')
LAYERS = ('runtime', 'launcher', 'tooling', 'command line')


class Section:
    def __init__(self, title: str, line: int) -> None:
        self.title, self.line = title, line

    @property
    def layer(self) -> str:
        if self.title.startswith(RUNTIME):
            return 'runtime'
        if self.title.startswith('Launcher'):
            return 'launcher'
        if self.title.startswith('Command line'):
            return 'command line'
        return 'tooling'


def banner_sections(text: str) -> list[Section]:
    lines = text.splitlines()
    return [Section(lines[i + 1][2:], i + 2) for i in range(len(lines) - 2)
            if lines[i] == BANNER and lines[i + 2] == BANNER]


def defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [target.id for target in node.targets if isinstance(target, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


class NamesOutsideAnnotations(ast.NodeVisitor):
    """The names a statement uses, skipping argument, return and variable annotations."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def visit_Name(self, node: ast.Name) -> None:
        self.names.add(node.id)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for decorator in node.decorator_list:
            self.visit(decorator)
        for default in (*node.args.defaults, *node.args.kw_defaults):
            if default is not None:
                self.visit(default)
        for statement in node.body:
            self.visit(statement)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)


def forward_references(path: Path) -> list[str]:
    """Each reference that breaks the layering, as ``section: name -> section``."""
    text = path.read_text()
    sections = banner_sections(text)
    starts = [section.line for section in sections]
    tree = ast.parse(text)

    def section_of(node: ast.stmt) -> int:
        return bisect.bisect_right(starts, node.lineno) - 1

    where = {name: section_of(node) for node in tree.body for name in defined_names(node)}
    found = []
    for node in tree.body:
        user = section_of(node)
        if user < 0:
            continue
        visitor = NamesOutsideAnnotations()
        visitor.visit(node)
        for name in sorted(visitor.names):
            owner = where.get(name, -1)
            if owner <= user:
                continue
            mine, theirs = sections[user], sections[owner]
            if mine.layer == 'runtime' and theirs.layer == 'runtime':
                continue  # the runtime is one layer: its parts name each other freely
            found.append(f'{mine.title}: {", ".join(defined_names(node)) or "a statement"} '
                         f'names {name} -> {theirs.title}')
    return found


def test_the_core_is_in_layers_in_their_order() -> None:
    sections = banner_sections((ROOT / 'microagent.py').read_text())
    layers = [section.layer for section in sections]
    assert layers == sorted(layers, key=LAYERS.index), [s.title for s in sections]
    assert set(layers) == set(LAYERS)
    assert sections[-1].title.startswith('Command line')


@pytest.mark.parametrize('module', ['microagent.py', 'microagent_backends.py'])
def test_nothing_names_what_a_later_layer_defines(module: str) -> None:
    assert forward_references(ROOT / module) == []


def test_the_check_finds_a_forward_reference(tmp_path: Path) -> None:
    """The check itself can fail: a runtime function naming the launcher is reported,
    one that names it only in an annotation is not."""
    source = '\n'.join([
        BANNER, '# Bus: signals', BANNER,
        'def send(x: Later) -> Later:',
        '    return x',
        'def start():',
        '    return Later()',
        BANNER, '# Launcher: processes', BANNER,
        'class Later:',
        '    pass',
        ''])
    module = tmp_path / 'layered.py'
    module.write_text(source)
    assert forward_references(module) == ['Bus: signals: start names Later -> Launcher: processes']
