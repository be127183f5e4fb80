"""Every megatron-core patch is registered and checked (megatron_ext/platform/patches.py).

Guarantees shown: each record's patched names exist in the installed megatron-core; a version
outside the tested set is refused with one line naming it and the patches; and every place in
megatron_ext that assigns to a megatron-core name (``x.attr = ``, ``setattr``, an attribute of
an ``isinstance``-narrowed megatron object) or overrides a private method of a megatron-core
class has a record. The source walker is tested on sources with unregistered patches, so the
last check can fail.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import pytest

from megatron_ext.errors import EXIT_USER, UserError
from megatron_ext.platform import patches

ROOT = Path(__file__).resolve().parents[2] / "megatron_ext"


# --- the source walker ------------------------------------------------------------------------
def _dotted(node: ast.AST, bound: dict[str, str]) -> str | None:
    """The megatron-core name an expression denotes, through this module's imports/aliases."""
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, bound)
        return f"{base}.{node.attr}" if base else None
    return None


def _bindings(tree: ast.Module) -> dict[str, str]:
    """Local name -> megatron dotted name: imports anywhere in the module (functions too), then
    plain aliases (``cls = tp_random.CheckpointWithoutOutput``) until nothing changes."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "megatron":
                    key = a.asname or a.name.split(".")[0]
                    bound[key] = a.name if a.asname else key
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron."):
            for a in node.names:
                bound[a.asname or a.name] = f"{node.module}.{a.name}"
    while True:
        size = len(bound)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)):
                target = _dotted(node.value, bound)
                if target:
                    bound.setdefault(node.targets[0].id, target)
        if len(bound) == size:
            return bound


def _assigned(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.Assign):
        return list(node.targets)
    if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        return [node.target]
    return []


def _narrowed(tree: ast.Module, bound: dict[str, str]) -> set[str]:
    """``if isinstance(v, MegatronClass): v.attr = ...`` -> MegatronClass.attr."""
    found = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if not (isinstance(node, ast.If) and isinstance(test, ast.Call)
                and getattr(test.func, "id", None) == "isinstance" and len(test.args) == 2
                and isinstance(test.args[0], ast.Name)):
            continue
        cls = _dotted(test.args[1], bound)
        for inner in (n for stmt in node.body for n in ast.walk(stmt)):
            for t in _assigned(inner):
                if (cls and isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                        and t.value.id == test.args[0].id):
                    found.add(f"{cls}.{t.attr}")
    return found


def _private_overrides(tree: ast.Module, bound: dict[str, str]) -> set[str]:
    """Methods ``_x`` of our subclasses that a megatron-core class in the base's MRO defines."""
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        methods = [f.name for f in node.body if isinstance(f, (ast.FunctionDef,
                                                               ast.AsyncFunctionDef))]
        for base in filter(None, (_dotted(b, bound) for b in node.bases)):
            mro = inspect.getmro(patches._resolve(base))
            for name in methods:
                if name.startswith("_") and not name.endswith("__") and any(
                        name in vars(k) for k in mro if k.__module__.startswith("megatron.")):
                    found.add(f"{base}.{name}")
    return found


def patch_sites(source: str) -> set[str]:
    """The megatron-core names one module's source patches."""
    tree = ast.parse(source)
    bound = _bindings(tree)
    found = _narrowed(tree, bound) | _private_overrides(tree, bound)
    for node in ast.walk(tree):
        for t in _assigned(node):
            if isinstance(t, ast.Attribute) and _dotted(t, bound):
                found.add(_dotted(t, bound))
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr"
                and len(node.args) >= 2 and _dotted(node.args[0], bound)):
            attr = node.args[1].value if isinstance(node.args[1], ast.Constant) else "<dynamic>"
            found.add(f"{_dotted(node.args[0], bound)}.{attr}")
    return found


def unregistered(module: str, sites: set[str]) -> set[str]:
    registered = {name for p in patches.PATCHES if p.module == module
                  for name in (*p.targets, *p.adds)}
    return sites - registered


def _tree_sites() -> dict[str, set[str]]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[module.removesuffix(".__init__")] = patch_sites(path.read_text(encoding="utf-8"))
    return out


# --- the tree ---------------------------------------------------------------------------------
def test_every_patch_site_in_the_tree_has_a_record():
    sites = _tree_sites()
    assert sum(map(len, sites.values())) >= 10  # the walker sees the patches we know of
    problems = {m: sorted(unregistered(m, s)) for m, s in sites.items() if unregistered(m, s)}
    assert not problems, f"unregistered megatron-core patches (add to patches.py): {problems}"
    for p in patches.PATCHES:  # and no record outlives its patch
        assert p.module in sites, f"{p.name}: module {p.module} does not exist"
        if p.targets or p.adds:
            assert sites[p.module] & {*p.targets, *p.adds}, f"{p.name}: no site in {p.module}"


def test_every_patched_name_exists_in_the_installed_megatron_core():
    assert patches.installed_version() in patches.TESTED_VERSIONS
    for p in patches.PATCHES:
        assert p.remove_when and p.module.startswith("megatron_ext.")
        for name in p.targets:
            assert patches.exists(name), f"{p.name}: {name}"
    assert patches.missing() == []
    patches.check()  # the start-up call passes on the pinned version


@pytest.mark.parametrize("version", ["0.16.0", "0.17.0", "0.16.1rc1", "1.0.0"])
def test_an_untested_version_is_refused_in_one_line(version):
    with pytest.raises(patches.UnsupportedMegatron) as err:
        patches.check(version)
    text = str(err.value)
    assert isinstance(err.value, UserError) and err.value.exit_code == EXIT_USER
    assert "\n" not in text and f"megatron-core {version} " in text
    assert all(p.name in text for p in patches.PATCHES) and "0.16.1" in text


@pytest.mark.parametrize("target", ["megatron.core.parallel_state._no_such_global",
                                    "megatron.core.models.gpt.GPTModel._no_such_method",
                                    "megatron.core.no_such_module.thing"])
def test_a_patched_name_gone_upstream_is_named(target):
    gone = patches.Patch("gone", "megatron_ext.x", targets=(target,), upstream="",
                         remove_when="never")
    with pytest.raises(patches.UnsupportedMegatron, match="gone") as err:
        patches.check(patches.TESTED_VERSIONS[0], (*patches.PATCHES, gone))
    assert f"{target} (gone)" in str(err.value) and "\n" not in str(err.value)


# --- the walker finds unregistered patches ----------------------------------------------------
UNREGISTERED = {
    "assign": ("from megatron.core import parallel_state as ps\nps._GLOBAL = 1\n",
               "megatron.core.parallel_state._GLOBAL"),
    "alias": ("import megatron.core.tensor_parallel.random as r\nc = r.CheckpointWithoutOutput\n"
              "def f():\n    c.forward = None\n",
              "megatron.core.tensor_parallel.random.CheckpointWithoutOutput.forward"),
    "setattr": ("def f():\n    from megatron.core.transformer.moe import moe_utils\n"
                "    setattr(moe_utils, 'te_general_gemm', None)\n",
                "megatron.core.transformer.moe.moe_utils.te_general_gemm"),
    "isinstance": ("from megatron.core.transformer.moe.moe_layer import MoELayer\n"
                   "def f(m):\n    for x in m.modules():\n        if isinstance(x, MoELayer):\n"
                   "            x.router = None\n",
                   "megatron.core.transformer.moe.moe_layer.MoELayer.router"),
    "override": ("from megatron.core.models.gpt import GPTModel\nclass M(GPTModel):\n"
                 "    def _postprocess(self, *a, **k):\n        return None\n"
                 "    def _ours(self):\n        return None\n",
                 "megatron.core.models.gpt.GPTModel._postprocess"),
}


@pytest.mark.parametrize("kind", sorted(UNREGISTERED))
def test_the_walker_finds_an_unregistered_patch(kind):
    source, site = UNREGISTERED[kind]
    assert patch_sites(textwrap.dedent(source)) == {site}
    assert unregistered("megatron_ext.somewhere", {site}) == {site}


def test_the_walker_ignores_what_is_not_a_megatron_patch():
    source = ("import torch\nfrom megatron.core.transformer.module import MegatronModule\n"
              "torch.cuda.current_device = None\nclass M(MegatronModule):\n"
              "    def _mine(self):\n        self.x = 1\n"
              "    def _load_from_state_dict(self, *a):\n        return None\n")
    assert patch_sites(source) == set()  # torch's own names and methods are not megatron's
