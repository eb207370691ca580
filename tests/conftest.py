import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# one cache for the whole session (the digit classifier, codec presets, latents, text embeddings), never the user's
# ~/.cache; removed when the session ends (subprocesses inherit the variable and leave it alone)
if "PATCHFLOW_CACHE" not in os.environ:
    os.environ["PATCHFLOW_CACHE"] = tempfile.mkdtemp(prefix="patchflow-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PATCHFLOW_CACHE"], ignore_errors=True)
SESSION_CACHE = Path(os.environ["PATCHFLOW_CACHE"])


@pytest.fixture(autouse=True)
def _restore_threads():
    """Runs set train.num_threads in this process; every test leaves torch's thread count as it found it."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def session_cache() -> Path:
    """The session's $PATCHFLOW_CACHE. Modules that pin the cache for their runs pin it here, so that what is
    trained into it once (the digit classifier above all) is found by every test of the session."""
    return SESSION_CACHE


@pytest.fixture(scope="session")
def digit_classifier_training(tmp_path_factory):
    """The session's one training of the digit classifier: (classifier, seconds the first get_classifier took =
    training + caching, the folder it cached into, which holds nothing else).

    Its file is then copied into the session's cache, so that every other get_classifier() of the session, with
    the default cache, loads it instead of training again (each training is under a minute on 2 free cores, minutes
    on a busy machine). Tests that score digits through the CLI ask for this fixture, so that it runs first.
    """
    from patchflow.evaluate.digits import CACHE_FILENAME, get_classifier

    folder = tmp_path_factory.mktemp("digit-classifier")
    assert not (folder / CACHE_FILENAME).exists()
    t0 = time.perf_counter()
    classifier = get_classifier(folder, verbose=False)
    seconds = time.perf_counter() - t0
    shared = SESSION_CACHE / CACHE_FILENAME
    if not shared.exists():
        SESSION_CACHE.mkdir(parents=True, exist_ok=True)
        part = shared.with_name(f".{CACHE_FILENAME}.{os.getpid()}.conftest")
        shutil.copyfile(folder / CACHE_FILENAME, part)
        os.replace(part, shared)
    return classifier, seconds, folder


@pytest.fixture(scope="session")
def digit_classifier(digit_classifier_training):
    return digit_classifier_training[0]
