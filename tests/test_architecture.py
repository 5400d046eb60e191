"""The layout's rules that import-linter cannot see: configs are discovered, thin and direct TaskConfigs."""

import ast
import glob
import os
import sys

from monailabel.interfaces.config import TaskConfig

from helpers import REPO

CONFIG_DIR = os.path.join(REPO, "lib", "configs")


def config_modules():
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                  if not os.path.basename(p).startswith("_") and not p.endswith("backbones.py"))


def test_the_app_discovers_one_direct_task_config_per_config_module():
    sys.path.insert(0, os.path.join(REPO, "apps"))
    try:
        import main
    finally:
        sys.path.remove(os.path.join(REPO, "apps"))
    discovered = main.discovered_configs()
    assert sorted(discovered) == config_modules()
    for cls in discovered.values():
        assert cls.__bases__ == (TaskConfig,), f"{cls.__name__} must subclass TaskConfig directly (MONAI Label)"


def test_configs_are_thin_wiring():
    """A config builds tasks from a method's classes: no function of its own beyond TaskConfig's hooks."""
    hooks = {"init", "infer", "trainer", "build_model", "build_sam", "strategy", "scoring_method"}
    for name in config_modules():
        with open(os.path.join(CONFIG_DIR, f"{name}.py")) as f:
            tree = ast.parse(f.read())
        top_functions = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert not top_functions, f"lib/configs/{name}.py defines {top_functions}: move them into the method"
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            methods = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
            assert methods <= hooks, f"lib/configs/{name}.py: {sorted(methods - hooks)} belong in the method"
