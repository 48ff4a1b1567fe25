"""The install a user gets: one import name, nothing else in site-packages, package data, lazy imports, layers."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import neardup

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "neardup"

#: The stages, bottom up: a module may import (at run time) only modules of earlier rows. Every module of the
#: package is listed, so a new module must be given its place here.
LAYERS: list[list[str]] = [
    ["errors", "_lazy"],
    ["config", "fileio", "threads"],
    ["features", "progress"],
    ["__init__", "embed/__init__", "indexer/__init__", "search/__init__", "store/__init__"],  # lazy re-exports only
    # embed/: photos to vectors; it imports nothing from store/ (nor store/ from it)
    ["embed/discover"],
    ["embed/local_features"],
    ["embed/decode"],
    ["embed/embedders"],
    ["embed/onnx_runtime"],
    ["embed/torch_pickle"],
    ["embed/efficientnet_lite"],
    ["embed/onnx_export"],
    ["embed/models"],
    ["embed/pipeline"],
    # store/: the HDF5 store and its FAISS index; it knows no model
    ["store/index_kinds"],
    ["store/faiss_index"],
    ["store/files"],
    ["store/settings"],
    ["store/lock", "store/meta", "store/h5io"],
    ["store/segment"],
    ["store/manifest"],
    ["store/damage"],
    ["store/generation"],
    ["store/repair"],
    ["store/publish"],
    ["store/decisions"],
    ["store/restore"],
    ["store/handle"],
    ["store_embedder"],  # the glue above both: the embedder a store was made with
    ["indexer/checkpoint", "indexer/scan", "indexer/options"],
    ["indexer/embed_job"],
    ["indexer/ray_job"],
    ["indexer/diff"],
    ["indexer/build"],
    ["search/verify", "search/truth", "search/review"],
    ["search/inliers"],  # the inlier correspondences of a pair, for drawing (review page, plot)
    ["search/verify_jobs"],
    ["search/query"],
    ["search/join"],
    ["search/candidates"],
    ["search/grouping", "search/dup_records"],
    ["search/duplicates"],
    ["search/pairs_io", "search/metrics", "search/plots"],
    ["search/listed"],
    ["search/eval_result"],
    ["search/evaluate", "search/report"],
    ["search/decided"],
    ["testing/products"],
    ["testing/render"],
    ["testing/__init__"],
    ["testing/grocery"],
    ["demo"],
    ["serve/protocol", "serve/live", "serve/fair"],
    ["serve/service"],
    ["serve/guard"],
    ["serve/review"],  # the review page's queue and routes: the decisions journal and duplicates, below the app
    ["serve/app", "serve/client"],
    ["serve/__init__"],
    ["cli/base", "cli/options"],
    ["cli/render", "cli/review"],
    ["cli/indexing"],
    ["cli/searching", "cli/serving"],
    ["cli/__init__"],
    ["__main__"],
]
#: Modules allowed past ~400 lines because one concern needs it.
LONG_ONE_CONCERN: dict[str, str] = {}
RANK = {name: k for k, row in enumerate(LAYERS) for name in row}


def _module_name(path: Path) -> str:
    return path.relative_to(SRC).with_suffix("").as_posix()


def _runtime_imports(path: Path) -> set[str]:
    """neardup modules `path` imports, at module level or inside functions, but not under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path).split("/")[:-1]
    skip: set[int] = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks import for annotations only
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
            elif (node.module or "").startswith("neardup"):
                base = []
            else:
                continue
            parts = [*base, *((node.module or "").split(".") if node.module else [])]
            if parts and parts[0] == "neardup" and not node.level:
                parts = parts[1:]
            found.add("/".join(parts) if parts else "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("neardup"):
                    found.add("/".join(alias.name.split(".")[1:]) or "__init__")
    resolved = set()
    for name in found:  # a package import means its __init__
        resolved.add(name + "/__init__" if (SRC / name).is_dir() else name)
    return resolved


def test_every_module_has_a_place_and_imports_no_later_stage() -> None:
    modules = sorted(SRC.rglob("*.py"))
    names = {_module_name(p) for p in modules}
    assert names == set(RANK), f"modules without a layer: {names - set(RANK)}; listed but gone: {set(RANK) - names}"
    wrong = []
    for path in modules:
        me = _module_name(path)
        for dep in _runtime_imports(path):
            if RANK[dep] >= RANK[me] and dep != me:
                wrong.append(f"{me} imports {dep}")
    assert not wrong, wrong


def test_the_store_knows_no_model_and_the_models_know_no_store() -> None:
    """store/ imports nothing from embed/ or the indexing job, embed/ nothing from store/: the glue that makes
    a store's embedder (store_embedder) sits above both."""
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        me = _module_name(path)
        for dep in _runtime_imports(path):
            if me.startswith("store/") and dep.split("/")[0] in ("embed", "indexer", "store_embedder"):
                wrong.append(f"{me} imports {dep}")
            if me.startswith("embed/") and dep.split("/")[0] in ("store", "indexer", "store_embedder"):
                wrong.append(f"{me} imports {dep}")
    assert not wrong, wrong


def test_every_module_says_its_stage_first() -> None:
    for path in sorted(SRC.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc and doc.splitlines()[0].strip(), f"{path} has no docstring saying what it is"
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= 420 or _module_name(path) in LONG_ONE_CONCERN, f"{path}: {lines} lines, over ~400"


def _python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_users_search_and_indexer_modules_do_not_shadow_neardup(tmp_path: Path) -> None:
    # a folder holding a user's own `search.py` and `indexer/` package, first on sys.path
    (tmp_path / "search.py").write_text("raise ImportError('the user search.py was imported')\n")
    (tmp_path / "indexer").mkdir()
    (tmp_path / "indexer" / "__init__.py").write_text("raise ImportError('the user indexer was imported')\n")
    code = ("import neardup, neardup.cli\n"
            "from neardup import (build_index, update_index, query, find_duplicates, compare, evaluate, "
            "write_report, Embedder)\n"
            "print('neardup ok')\n"
            "try:\n"
            "    import search\n"
            "except ImportError as exc:\n"
            "    print(exc)\n")
    r = _python(code, tmp_path, PYTHONPATH=str(tmp_path))
    # neardup works, and the user's own module is what `import search` finds (it really is first on the path)
    assert r.returncode == 0 and r.stdout.split("\n")[:2] == ["neardup ok", "the user search.py was imported"], r
    r = subprocess.run([sys.executable, "-m", "neardup", "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0 and "Usage" in r.stdout and "index" in r.stdout, r.stderr


def test_import_and_help_load_no_heavy_library(tmp_path: Path) -> None:
    heavy = ["numpy", "h5py", "faiss", "tensorflow", "matplotlib", "scipy", "PIL", "neardup.store.handle",
             "neardup.store.generation", "neardup.search.report", "neardup.search.evaluate"]
    code = ("import sys\n"
            "import neardup\n"
            "from neardup.cli import app\n"
            "from typer.testing import CliRunner\n"
            "r = CliRunner().invoke(app, ['--help'])\n"
            "assert r.exit_code == 0, r.output\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n")
    r = _python(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"loaded by `import neardup` and `neardup --help`: {r.stdout}"


def test_public_api_is_importable_from_neardup() -> None:
    for name in ("build_index", "update_index", "query", "find_duplicates", "compare", "evaluate", "write_report",
                 "Embedder", "__version__"):
        assert name in neardup.__all__ and getattr(neardup, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        neardup.nope  # noqa: B018 - the attribute look-up is what must fail


def test_reexports_are_the_objects_not_modules_whatever_was_imported_first() -> None:
    import importlib
    import types

    for path in sorted(SRC.rglob("*.py")):  # every submodule imported: the case where a name could turn
        name = _module_name(path).replace("/", ".").removesuffix(".__init__").removesuffix("__init__")
        if name != "__main__":
            importlib.import_module(f"neardup.{name}".rstrip("."))
    for package in ("neardup", "neardup.indexer", "neardup.search"):
        mod = importlib.import_module(package)
        modules = [n for n in mod.__all__ if isinstance(getattr(mod, n), types.ModuleType)]
        assert not modules, f"{package} re-exports modules, not objects: {modules}"


def test_wheel_holds_only_neardup_with_its_data(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("neardup-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"neardup", f"neardup-{neardup.__version__}.dist-info"}, tops
    sample = [n for n in names if n.startswith("neardup/sample/catalog/")]
    shipped = [p for p in (SRC / "sample" / "catalog").rglob("*") if p.is_file()]
    assert len(sample) == len(shipped) == 119 and "neardup/sample/truth.csv" in names
    for template in ("report.html", "report.css", "report.js", "missing.svg"):
        assert f"neardup/search/templates/{template}" in names
    entry = zipfile.ZipFile(wheel).read(f"neardup-{neardup.__version__}.dist-info/entry_points.txt").decode()
    assert "neardup = neardup.cli:main" in entry
    assert "neardup/py.typed" in names  # PEP 561: a user's type checker reads neardup's hints


def _lazy_exports(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A package's _EXPORTS (name -> module) and what its `if TYPE_CHECKING:` block imports (name -> module,
    each `X as X`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    exports: dict[str, str] = {}
    typed: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            exports = eval(compile(ast.Expression(node.value), str(path), "eval"))  # dicts of literals only
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom), ast.dump(imp)
                for alias in imp.names:
                    assert alias.asname == alias.name, f"{path}: {alias.name} is not re-exported as itself"
                    typed[alias.name] = "." * imp.level + (imp.module or "")
    return exports, typed


def test_type_checkers_see_every_lazy_export_from_its_module() -> None:
    """What a package loads lazily at run time (_EXPORTS) and what type checkers and editors are shown (its
    TYPE_CHECKING imports) are the same names from the same modules, so a user's mypy checks calls into the
    public API (a wrong keyword to StoreMeta, say) instead of seeing Any."""
    packages = [p for p in sorted(SRC.rglob("__init__.py")) if "lazy_exports" in p.read_text(encoding="utf-8")]
    assert len(packages) >= 6, packages
    for path in packages:
        exports, typed = _lazy_exports(path)
        assert exports, f"{path}: lazy_exports without an _EXPORTS table"
        assert typed == exports, f"{path}: TYPE_CHECKING imports differ from _EXPORTS: " \
            f"{sorted(set(typed.items()) ^ set(exports.items()))}"


#: Parameters a function of src/ may take (positional and keyword-only; *args and **kwargs not counted): beyond,
#: a record (IndexOptions, ServeOptions, ...) carries them. A typer command takes one per option.
MAX_PARAMS = 12


def _is_command(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated `@app.command(...)`: a typer command, whose parameters are its options."""
    return any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "command"
               for d in fn.decorator_list)


def _too_long(tree: ast.AST) -> list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, int]]:
    """The functions of `tree` but typer commands with more than MAX_PARAMS parameters, and their counts."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_command(node):
            n = len(node.args.posonlyargs) + len(node.args.args) + len(node.args.kwonlyargs)
            if n > MAX_PARAMS:
                out.append((node, n))
    return out


def long_signatures() -> list[str]:
    """Every function of src/ but typer commands with more than MAX_PARAMS parameters, as path:line name (n)."""
    return [f"{path.relative_to(SRC)}:{fn.lineno} {fn.name} ({n})" for path in sorted(SRC.rglob("*.py"))
            for fn, n in _too_long(ast.parse(path.read_text(encoding="utf-8")))]


def test_long_signatures_finds_one() -> None:
    """The walk counts positional and keyword-only parameters, not *args/**kwargs, and spares commands."""
    import textwrap

    names = ", ".join(f"p{i}" for i in range(MAX_PARAMS))
    code = textwrap.dedent(f"""
        def ok({names}, *args, **kwargs): ...
        def over({names}, *, extra): ...
        @app.command("x")
        def cmd({names}, more): ...
    """)
    assert [(fn.name, n) for fn, n in _too_long(ast.parse(code))] == [("over", MAX_PARAMS + 1)]


def test_no_function_takes_more_than_twelve_parameters() -> None:
    assert long_signatures() == []
