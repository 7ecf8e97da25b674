"""Package discovery: every ``recbole_speeder`` and ``dataset_prep`` package ships without a hand-kept list.

``recbole_speeder.properties`` is added by name because its files live in the top-level ``properties/`` folder
(``[tool.setuptools.package-dir]`` in pyproject.toml), where no finder looks for it. Everything else is in
pyproject.toml.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["recbole_speeder", "recbole_speeder.*", "dataset_prep", "dataset_prep.*"]),
                "recbole_speeder.properties"])
