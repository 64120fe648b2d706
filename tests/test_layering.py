"""arjax's packages form layers and imports only go down: a backwards import fails here.

The table is the architecture map of the README: a module may import from its own package
and from any layer below its own, never from a layer above or a sibling on its own layer.
Every import counts, also those inside functions (imported late for start-up time): a late
import is still a dependency.
"""
import ast
import pathlib


ROOT = pathlib.Path(__file__).resolve().parent.parent / "arjax"

# Top to bottom. Packages on one line are siblings: neither may import the other.
LAYERS = (
    ("arjax.__main__",),
    ("arjax.commands",),
    ("arjax.serving", "arjax.perf", "arjax.convert"),
    ("arjax.training",),
    ("arjax.evaluation",),
    ("arjax.data",),
    ("arjax.registry",),
    ("arjax.families",),
    ("arjax.sampling",),
    ("arjax.heads",),
    ("arjax.tokenizers",),
    ("arjax.layers",),
    ("arjax.parallel",),
    ("arjax.config",),
    ("arjax.util", "arjax.weights"),
    ("arjax.errors",),
)


def _unit(module: str):
  """(layer index, unit name) of a dotted module name inside arjax."""
  for level, units in enumerate(LAYERS):
    for unit in units:
      if module == unit or module.startswith(unit + "."):
        return level, unit
  return None


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _imports(path: pathlib.Path):
  """(line, imported module) of every arjax import in a file, at any depth."""
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:  # `from arjax import x` imports the module arjax.x
        yield node.lineno, f"{node.module}.{alias.name}"


def _modules():
  return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_belongs_to_a_layer():
  orphans = [_module_name(p) for p in _modules()
             if _module_name(p) != "arjax" and _unit(_module_name(p)) is None]
  assert not orphans, f"modules in no layer of LAYERS (add them to the table): {orphans}"


def violations():
  found = []
  for path in _modules():
    me = _module_name(path)
    mine = _unit(me)
    if mine is None:
      continue
    for line, target in _imports(path):
      if not target.startswith("arjax"):
        continue
      theirs = _unit(target)
      if theirs is None or theirs[1] == mine[1]:
        continue
      if theirs[0] <= mine[0]:
        what = "a sibling" if theirs[0] == mine[0] else "a layer above"
        found.append(f"{path.relative_to(ROOT.parent)}:{line}: {me} imports {target} "
                     f"({what}: {theirs[1]})")
  return found


def test_imports_only_go_down():
  assert not violations(), "backwards imports:\n" + "\n".join(violations())


def test_the_check_catches_a_backwards_import(tmp_path, monkeypatch):
  # The check itself can fail: a layer module importing the CLI is reported.
  fake = tmp_path / "arjax"
  (fake / "layers").mkdir(parents=True)
  (fake / "layers" / "bad.py").write_text("def f():\n  from arjax.training import loop\n")
  monkeypatch.setattr(__import__(__name__), "ROOT", fake)
  assert violations() == ["arjax/layers/bad.py:2: arjax.layers.bad imports arjax.training.loop "
                          "(a layer above: arjax.training)"]
