"""The package's structure and packaging: imports run one way without circles, modules stay small and say what they
do, `import cvvae_jax` loads no training or evaluation code, the command lines are declared and answer."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "cvvae_jax")
# What each subpackage may import besides itself and the base modules: data and models at the bottom, weights and
# inference above them, train and eval on top.
MAY_IMPORT = {
    "models": set(),
    "data": set(),
    "weights": {"models"},
    "inference": {"models", "data", "weights"},
    "train": {"models", "data", "weights"},
    "eval": {"models", "data", "weights", "inference"},
    "latents": {"models", "data", "weights", "inference"},
}
BASE = {"cli", "distributed", "metrics", "paths", "utils"}  # top-level modules below every subpackage: they import no other part
FACES = {"__init__", "tiling", "convert", "reconstruct", "encode_latents"}  # the public face and the old module paths
MAX_LINES = 450
ENTRY_POINTS = {"cvvae-train": "cvvae_jax.train.cli:main", "cvvae-eval": "cvvae_jax.eval.cli:main",
                "cvvae-reconstruct": "cvvae_jax.inference.reconstruct:main", "cvvae-convert": "cvvae_jax.weights.cli:main",
                "cvvae-prepare": "cvvae_jax.data.prepare:main",
                "cvvae-encode-latents": "cvvae_jax.latents.encode:main",
                "cvvae-checkpoint": "cvvae_jax.train.verify:main"}


def _modules() -> dict[str, str]:
  """{"cvvae_jax.models.layers": path, ...} (a package is named by its folder)."""
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        out[module] = path
  return out


MODULES = _modules()


def _resolve(name: str) -> str:
  while name not in MODULES:
    name = name.rpartition(".")[0]
  return name


def _imports(path: str) -> list[tuple[str, int, bool]]:
  """(imported cvvae_jax module, line, at module level) of every import in the file."""
  tree = ast.parse(open(path).read(), path)
  top = {id(node) for node in tree.body}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names]
    else:
      continue
    found += [(_resolve(n), node.lineno, id(node) in top) for n in names if n.split(".")[0] == "cvvae_jax"]
  return found


def _part(module: str) -> str:
  """The subpackage of a module ("models", ...), or its own name at the top level ("cli", "__init__", ...)."""
  parts = module.split(".")
  if len(parts) == 1:
    return "__init__"
  return parts[1]


def _edges() -> dict[str, set[str]]:
  return {m: {target for target, _, _ in _imports(p)} - {m} for m, p in MODULES.items()}


def test_import_cvvae_jax_loads_no_training_or_evaluation_module():
  code = "import sys, cvvae_jax; print(sorted(m for m in sys.modules if m.startswith('cvvae_jax')))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
  loaded = ast.literal_eval(out)
  assert "cvvae_jax.weights.pretrained" in loaded and "cvvae_jax.models.vae3d" in loaded
  assert not [m for m in loaded if _part(m) in ("train", "eval", "data", "inference")], loaded


def test_no_import_circles():
  edges = _edges()
  index, low, stack, on_stack, circles = {}, {}, [], set(), []

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        circles.append(sorted(component))

  for v in edges:
    if v not in index:
      visit(v)
  assert not circles, circles


def test_imports_run_one_way():
  wrong = []
  for module, targets in _edges().items():
    part = _part(module)
    for target in targets:
      to = _part(target)
      if part in FACES:
        allowed = to not in FACES or target == "cvvae_jax"  # the face and the old paths hand names on
      elif part in BASE:
        allowed = to in BASE
      else:
        allowed = to == part or to in BASE or to in MAY_IMPORT[part]
      if not allowed or (target.count(".") == 0 and part not in FACES):
        wrong.append(f"{module} -> {target}")
  assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_package_imports_sit_at_the_top_of_each_module():
  """No import hides inside a function (where it would dodge a circle)."""
  inner = [f"{os.path.relpath(p, REPO)}:{line} imports {target}" for m, p in MODULES.items()
           for target, line, top in _imports(p) if not top]
  assert not inner, "\n".join(inner)


def test_modules_are_small_and_say_what_they_do():
  for module, path in MODULES.items():
    source = open(path).read()
    assert source.count("\n") <= MAX_LINES, f"{module}: {source.count(chr(10))} lines (at most {MAX_LINES})"
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring and docstring.strip(), f"{module} has no docstring saying what it is for"


def test_entry_points_are_declared_and_resolve():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  assert project["scripts"] == ENTRY_POINTS
  for target in ENTRY_POINTS.values():
    module, _, function = target.partition(":")
    __import__(module)
    assert callable(getattr(sys.modules[module], function)), target
  assert {"test", "tpu", "cuda"} <= set(project["optional-dependencies"])
  torch = [r for r in project["optional-dependencies"]["test"] if r.startswith("torch")]
  assert torch == ["torch==2.13.0"]  # a CPU wheel here; an unpinned torch would pull a CUDA build


def test_version():
  import cvvae_jax
  assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+|\.dev\d+)?", cvvae_jax.__version__)


@pytest.mark.parametrize("target", [t for t in ENTRY_POINTS.values() if not t.startswith("cvvae_jax.train")])
def test_command_lines_print_their_help(target, capsys):
  module, _, function = target.partition(":")
  __import__(module)
  with pytest.raises(SystemExit) as e:
    getattr(sys.modules[module], function)(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: cvvae-") and "--help" in out


def test_train_and_old_module_paths_run_from_the_shell():
  # absl's --help exits with status 1 (train.py); argparse's with 0.
  for cmd, want, status in ((["train.py", "--help"], "--workdir: Directory for checkpoints", 1),
                            (["-m", "cvvae_jax.convert", "--help"], "usage: cvvae-convert", 0),
                            (["-m", "cvvae_jax.reconstruct", "--help"], "--resolution", 0)):
    run = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == status and want in run.stdout, (cmd, run.stdout[-2000:], run.stderr[-2000:])


def test_a_user_error_is_one_line_not_a_traceback(tmp_path, capsys):
  from cvvae_jax.weights import cli
  assert cli.main([str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "flax"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: no such model path:") and "Traceback" not in err and err.count("\n") == 1


def test_old_module_paths_keep_working():
  from cvvae_jax import convert, inference, reconstruct, tiling
  from cvvae_jax.inference import api, plan
  from cvvae_jax.inference import reconstruct as reconstruct_lib
  from cvvae_jax.inference import tiling as tiling_lib
  from cvvae_jax.weights import convert as convert_lib
  from cvvae_jax.weights import torch_format
  assert inference.encode is api.encode and inference.TilingConfig is plan.TilingConfig
  assert tiling.TilingConfig is plan.TilingConfig and tiling.apply_streaming is tiling_lib.apply_streaming
  assert tiling.chunk_progress is tiling_lib.chunk_progress and tiling.make_plan is plan.make_plan
  assert convert.torch_to_flax is convert_lib.torch_to_flax and convert.load_torch_folder is torch_format.load_torch_folder
  assert convert.WEIGHTS_NAME == torch_format.WEIGHTS_NAME and callable(convert.main)
  assert reconstruct.main is reconstruct_lib.main


def test_tests_read_nothing_outside_the_repository():
  """CI runs the suite from a copy of the checkout with nothing beside it (`.ci/run`)."""
  tests = os.path.join(REPO, "tests")
  offending = []
  for folder, _, files in os.walk(tests):
    for name in files:
      if name.endswith(".py"):
        text = open(os.path.join(folder, name)).read()
        if re.search(r"\.\./shared|['\"]shared['\"]|CVVAE_REFERENCE", text) and name != "test_package.py":
          offending.append(os.path.relpath(os.path.join(folder, name), REPO))
  assert not offending, offending
