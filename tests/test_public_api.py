"""The Python API the README documents is importable, exactly as the README writes it.

Before 1.0 only this API is stable (everything else may move). The names are read
from the README's own ``python`` code blocks, so the test follows the README: a
renamed module or function breaks it until the README says the new name.
"""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _readme_imports() -> list[tuple[str, str]]:
  """(module, name) of every ``from deepflow_jax... import a, b`` in the README's python blocks."""
  with open(README, encoding="utf-8") as f:
    text = f.read()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  out = []
  for block in blocks:
    for module, names in re.findall(r"^from (deepflow_jax[\w.]*) import ([\w, ]+)", block,
                                    flags=re.M):
      out += [(module, n.strip()) for n in names.split(",") if n.strip()]
  return out


PUBLIC = _readme_imports()


def test_the_readme_documents_an_api():
  # The README's sections: models and weights, sampling, images, training, evaluation.
  for entry in (("deepflow_jax.models.loading", "load_model"),
                ("deepflow_jax.sampling", "SamplerSettings"), ("deepflow_jax", "images"),
                ("deepflow_jax", "training"), ("deepflow_jax.evaluation", "suite")):
    assert entry in PUBLIC, PUBLIC


@pytest.mark.parametrize("module,name", PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_name_importable(module, name):
  namespace = {}
  exec(f"from {module} import {name}", namespace)  # exactly the README's statement
  assert namespace[name] is not None
