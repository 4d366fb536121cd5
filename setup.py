"""Build step for the wheel: ship the source bundles as package data.

Everything else about the package is declared in ``pyproject.toml``. The repository's ``bundles/`` folder stays the
only hand-edited copy of the bundle configs; building a wheel copies each ``bundles/<name>/`` folder (``m2diff``,
``mfdiff`` and ``schema``, MONAI's metadata schema) into the wheel as ``m2diff_monai/bundles/<name>/``, where
``m2diff_monai.shipped`` finds them (``--bundle m2diff`` without a checkout). Editable installs get no copy: they
read the checkout's ``bundles/`` (``--bundle bundles/m2diff``). ``MANIFEST.in`` puts ``bundles/`` into the sdist so
a wheel built from the sdist has them too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SOURCE_BUNDLES = Path(__file__).resolve().parent / "bundles"
SHIPPED_BUNDLES = Path("m2diff_monai") / "bundles"  # m2diff_monai.shipped.SHIPPED_DIR
SHIPPED_SUFFIXES = (".json", ".conf", ".md")


class BuildPyWithBundles(build_py):
    """``build_py`` plus a copy of ``bundles/*/`` (JSON, logging.conf, README) into the built package."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        folders = sorted(p for p in SOURCE_BUNDLES.glob("*") if p.is_dir()) if SOURCE_BUNDLES.is_dir() else []
        if not folders:
            raise FileNotFoundError(f"{SOURCE_BUNDLES}: no bundle folders to ship (build from a checkout or sdist)")
        for folder in folders:
            target = Path(self.build_lib) / SHIPPED_BUNDLES / folder.name
            target.mkdir(parents=True, exist_ok=True)
            for source in sorted(folder.iterdir()):
                if source.is_file() and source.suffix in SHIPPED_SUFFIXES:
                    shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildPyWithBundles})
