"""Shared test fixtures. Golden files are copies of ../shared/golden (reference outputs)."""
import os

import numpy as np
import pytest

DATA = os.path.join(os.path.dirname(__file__), "data")
TINY2T_PT = os.path.join(DATA, "tiny2t.pt")


def nhwc(a):
  """Reference NCHW arrays -> our NHWC."""
  return np.transpose(np.asarray(a), (0, 2, 3, 1))


@pytest.fixture(scope="session")
def golden():
  return dict(np.load(os.path.join(DATA, "tiny2t.npz")))


@pytest.fixture(scope="session")
def tiny2t():
  """(model, ema params) converted from the reference's tiny2t.pt."""
  from deepflow_jax.convert import load_torch_checkpoint
  return load_torch_checkpoint(TINY2T_PT, "ema")
