"""Tests of patchflow.evaluate.digits: Frechet distance, the digit classifier and its cache, evaluate_samples."""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch

import patchflow.evaluate.digits as ev
from patchflow.data.digits import load_digits
from patchflow.evaluate.digits import (
    CACHE_FILENAME,
    CLASSIFIER_VERSION,
    DigitClassifier,
    evaluate_samples,
    frechet_distance,
    get_classifier,
    to_classifier_input,
)

# ------------------------------------------------------------------------------------------------
# fixtures: the classifier is trained once per session, into a pytest tmp dir (conftest: the session's one
# training, which every other file's classifier loads)


@pytest.fixture(scope="session")
def cache_dir(digit_classifier_training):
    """The folder the session's classifier was trained and cached into (from empty); it holds only that file."""
    return digit_classifier_training[2]


@pytest.fixture(scope="session")
def trained(digit_classifier_training):
    """(classifier, seconds the first get_classifier took = training + caching)."""
    clf, seconds, _ = digit_classifier_training
    print(f"\ndigit classifier: trained in {seconds:.1f}s, val accuracy {clf.val_accuracy:.4f}")
    return clf, seconds


@pytest.fixture(scope="session")
def classifier(trained):
    return trained[0]


@pytest.fixture(scope="session")
def val_digits():
    return load_digits("val")


def _no_training(*args, **kwargs):
    raise AssertionError("the classifier was retrained although a valid cache file exists")


def _fast_stub_trainer(calls):
    def train(verbose=True):
        calls.append(1)
        m = DigitClassifier().eval()
        m.val_accuracy = 0.5
        return m

    return train


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------
# frechet_distance


def _exact_gaussian_sample(rng, mu, var, n=400):
    """Samples whose empirical mean is exactly `mu` and covariance (ddof=1) exactly diag(var)."""
    d = len(mu)
    z = rng.standard_normal((n, d))
    z -= z.mean(0)
    w, v = np.linalg.eigh(np.cov(z, rowvar=False))
    z = z @ v @ np.diag(w**-0.5) @ v.T  # empirical covariance now exactly I
    return z * np.sqrt(var) + mu


def test_fd_identical_sets_is_zero():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 32)) @ rng.standard_normal((32, 32)) + 3.0
    scale = np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, a) <= 1e-9 * scale
    # fewer samples than dims (singular covariance) is handled too
    b = a[:10]
    assert frechet_distance(b, b) <= 1e-9 * scale
    assert frechet_distance(a, a + 1.0) == pytest.approx(32.0, rel=1e-9)  # pure mean shift


def test_fd_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(1)
    d = 12
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    var_a, var_b = rng.uniform(0.2, 3.0, size=d), rng.uniform(0.2, 3.0, size=d)
    a = _exact_gaussian_sample(rng, mu_a, var_a)
    b = _exact_gaussian_sample(rng, mu_b, var_b, n=257)
    expected = ((mu_a - mu_b) ** 2).sum() + (var_a + var_b - 2 * np.sqrt(var_a * var_b)).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    # rotating both sets by one orthogonal matrix leaves the distance unchanged (non-diagonal covariances)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    assert frechet_distance(a @ q, b @ q) == pytest.approx(expected, rel=1e-8)


def test_fd_general_matches_eigenvalue_formula_and_is_symmetric():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((500, 8)) @ rng.standard_normal((8, 8))
    b = rng.standard_normal((300, 8)) @ rng.standard_normal((8, 8)) + 0.5
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # independent route: tr((Sa Sb)^1/2) = sum of sqrt of the (real, non-negative) eigenvalues of Sa Sb
    tr_cross = np.sqrt(np.clip(np.linalg.eigvals(sa @ sb).real, 0, None)).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_cross
    fd_ab, fd_ba = frechet_distance(a, b), frechet_distance(b, a)
    assert fd_ab == pytest.approx(expected, rel=1e-8)
    assert fd_ab == pytest.approx(fd_ba, rel=1e-9)
    assert isinstance(fd_ab, float) and fd_ab > 0


def test_fd_rejects_bad_input():
    a = np.zeros((10, 4))
    with pytest.raises(ValueError, match="2-d"):
        frechet_distance(np.zeros(10), a)
    with pytest.raises(ValueError, match="feature dims differ"):
        frechet_distance(a, np.zeros((10, 5)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        frechet_distance(a, np.zeros((1, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(a, np.full((10, 4), np.nan))


# ------------------------------------------------------------------------------------------------
# to_classifier_input


def test_to_classifier_input_layouts(val_digits):
    imgs = val_digits[0][:7]
    x = to_classifier_input(imgs)
    assert x.shape == (7, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1
    assert torch.equal(to_classifier_input(imgs[..., None]), x)
    assert torch.equal(to_classifier_input(np.repeat(imgs[..., None], 3, axis=-1)), x)  # grey RGB -> same
    rgb = np.zeros((1, 32, 32, 3), np.uint8)
    rgb[..., 1] = 255  # pure green -> luma 0.587 * 255
    assert float(to_classifier_input(rgb)[0, 0, 0, 0]) == pytest.approx(np.rint(0.587 * 255) / 127.5 - 1)
    # 28x28 (MNIST size) is zero-padded like the dataset
    assert torch.equal(to_classifier_input(imgs[:, 2:-2, 2:-2]), x)


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros((4, 32, 32, 2), np.uint8), r"\(N, H, W, 1\) or \(N, H, W, 3\)"),
        (np.zeros((4, 30, 30), np.uint8), "32x32"),
        (np.zeros((4, 32, 28), np.uint8), "32x32"),
        (np.zeros((32, 32), np.uint8), "shape"),
        (np.zeros((4, 1, 32, 32), np.uint8), "channels last"),
        (np.zeros((4, 32, 32), np.float32), "uint8"),
    ],
)
def test_to_classifier_input_rejects_bad_shapes(arr, match):
    with pytest.raises(ValueError, match=match):
        to_classifier_input(arr)


# ------------------------------------------------------------------------------------------------
# the classifier


def test_classifier_val_accuracy(classifier, val_digits):
    images, labels = val_digits
    assert isinstance(classifier, DigitClassifier) and not classifier.training
    x = to_classifier_input(images)
    with torch.no_grad():
        logits = classifier(x)
        feats = classifier.features(x[:5])
    assert logits.shape == (500, 10) and feats.shape == (5, DigitClassifier.feature_dim)
    acc = float((logits.argmax(1).numpy() == labels).mean())
    print(f"\nclassifier val accuracy: {acc:.4f}")
    assert acc >= 0.97
    assert acc == pytest.approx(classifier.val_accuracy, abs=1e-6)


def test_training_time(trained):
    _, seconds = trained
    # the budget is ~40 s on 2 free cores; allow slack for a loaded shared machine
    assert seconds < 180, f"training took {seconds:.0f}s"


def test_training_is_deterministic_and_keeps_global_rng(monkeypatch):
    # one epoch over 1,000 of the 4,500 training digits (15 full batches and a partial one): the whole training
    # code path, twice, each at about a fortieth of a full training's cost
    monkeypatch.setattr(ev, "_EPOCHS", 1)
    monkeypatch.setattr(ev, "load_digits", lambda split: tuple(a[:1000] for a in load_digits(split)))
    state = torch.get_rng_state()
    a = ev._train_classifier(verbose=False)
    b = ev._train_classifier(verbose=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert _state_equal(a, b)


# ------------------------------------------------------------------------------------------------
# the cache


def test_cache_is_used_on_second_call(classifier, cache_dir, monkeypatch):
    from safetensors import safe_open

    path = cache_dir / CACHE_FILENAME
    assert path.is_file()
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["version"] == CLASSIFIER_VERSION
    assert not [p for p in cache_dir.iterdir() if p.name != CACHE_FILENAME]  # no temp files left behind
    monkeypatch.setattr(ev, "_train_classifier", _no_training)
    t0 = time.perf_counter()
    again = get_classifier(cache_dir, verbose=False)
    assert time.perf_counter() - t0 < 5.0
    assert again is not classifier and not again.training
    assert _state_equal(again, classifier)
    assert again.val_accuracy == classifier.val_accuracy


def test_cache_dir_defaults_to_env(classifier, cache_dir, tmp_path, monkeypatch):
    shutil.copy(cache_dir / CACHE_FILENAME, tmp_path / CACHE_FILENAME)
    monkeypatch.setenv("PATCHFLOW_CACHE", str(tmp_path))
    monkeypatch.setattr(ev, "_train_classifier", _no_training)
    assert _state_equal(get_classifier(verbose=False), classifier)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_cache_is_replaced(classifier, cache_dir, tmp_path, monkeypatch, damage):
    path = tmp_path / CACHE_FILENAME
    good = (cache_dir / CACHE_FILENAME).read_bytes()
    path.write_bytes({"truncated": good[: len(good) // 2], "garbage": b"not a safetensors file" * 10,
                      "empty": b""}[damage])
    calls = []
    monkeypatch.setattr(ev, "_train_classifier", _fast_stub_trainer(calls))
    with pytest.warns(RuntimeWarning, match="unusable"):
        model = get_classifier(tmp_path, verbose=False)
    assert calls == [1]
    # the file was rewritten: it now loads cleanly, without training, to the new weights
    monkeypatch.setattr(ev, "_train_classifier", _no_training)
    assert _state_equal(get_classifier(tmp_path, verbose=False), model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_FILENAME]


def test_other_version_in_cache_is_retrained(classifier, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(tmp_path / CACHE_FILENAME),
              metadata={"version": "digitcnn-v0", "val_accuracy": "0.99"})
    calls = []
    monkeypatch.setattr(ev, "_train_classifier", _fast_stub_trainer(calls))
    with pytest.warns(RuntimeWarning, match="version"):
        model = get_classifier(tmp_path, verbose=False)
    assert calls == [1] and model.val_accuracy == 0.5


# ------------------------------------------------------------------------------------------------
# evaluate_samples


@pytest.fixture(scope="session")
def real_val_result(classifier, cache_dir, val_digits):
    return evaluate_samples(*val_digits, cache_dir=cache_dir)


def test_evaluate_real_val_digits(real_val_result, classifier):
    r = real_val_result
    print(f"\nreal val digits: accuracy {r['accuracy']:.4f}, fd {r['fd']:.4f}, fd_real {r['fd_real']:.4f}")
    assert set(r) == {"n", "accuracy", "per_class_accuracy", "fd", "fd_real", "classifier_val_accuracy"}
    assert r["n"] == 500
    assert r["accuracy"] >= 0.97
    assert len(r["per_class_accuracy"]) == 10 and min(r["per_class_accuracy"]) >= 0.85
    assert np.mean(r["per_class_accuracy"]) == pytest.approx(r["accuracy"])  # 50 per class
    assert r["classifier_val_accuracy"] == classifier.val_accuracy
    # the samples *are* the reference set: fd ~ 0, below the real-data floor
    assert 0 <= r["fd"] < 1e-6 * max(r["fd_real"], 1.0)
    assert r["fd_real"] > 0


def test_evaluate_other_real_digits_fd_close_to_fd_real(real_val_result, cache_dir):
    images, labels = load_digits("train")
    rng = np.random.default_rng(12345)  # 50 per class, like the val set, but a different draw than fd_real's
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), 50, replace=False) for c in range(10)])
    r = evaluate_samples(images[idx], labels[idx], cache_dir=cache_dir)
    print(f"\n500 other real train digits: accuracy {r['accuracy']:.4f}, fd {r['fd']:.4f}, "
          f"fd_real {r['fd_real']:.4f}, ratio {r['fd'] / r['fd_real']:.3f}")
    assert r["fd_real"] == pytest.approx(real_val_result["fd_real"])  # same n, same seed -> same floor
    assert 0.6 * r["fd_real"] < r["fd"] < 1.5 * r["fd_real"]  # the floor's seed-to-seed spread is ~10%
    assert r["accuracy"] >= 0.97


def test_evaluate_shuffled_labels(real_val_result, cache_dir, val_digits):
    images, labels = val_digits
    wrong = np.random.default_rng(0).permutation(labels)
    r = evaluate_samples(images, wrong, cache_dir=cache_dir)
    print(f"\nshuffled labels: accuracy {r['accuracy']:.4f}")
    assert r["accuracy"] < 0.2
    assert r["fd"] == pytest.approx(real_val_result["fd"], abs=1e-9)  # fd ignores labels


def test_evaluate_noise_images(real_val_result, cache_dir, val_digits):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(500, 32, 32), dtype=np.uint8)
    r = evaluate_samples(noise, val_digits[1], cache_dir=cache_dir)
    blank = evaluate_samples(np.zeros((500, 32, 32), np.uint8), val_digits[1], cache_dir=cache_dir)
    print(f"\nnoise: fd {r['fd']:.4f} (fd_real {r['fd_real']:.4f}); blank: fd {blank['fd']:.4f}")
    assert r["fd"] > 10 * r["fd_real"]
    assert blank["fd"] > 10 * blank["fd_real"]
    assert r["accuracy"] < 0.5


def test_evaluate_small_sample_count(cache_dir, val_digits):
    images, labels = val_digits
    r = evaluate_samples(images[::25], labels[::25], cache_dir=cache_dir, seed=3)  # 20 samples < 128 dims
    assert r["n"] == 20 and np.isfinite(r["fd"]) and np.isfinite(r["fd_real"]) and r["fd_real"] > 0
    assert len(r["per_class_accuracy"]) == 10


@pytest.mark.parametrize(
    "labels, match",
    [
        (np.zeros(9, np.int64), "length 9 but there are 10 images"),
        (np.full(10, 10), r"0\.\.9"),
        (np.full(10, -1), r"0\.\.9"),
        (np.zeros((10, 1), np.int64), "1-d"),
        (np.zeros(10, np.float32), "integers"),
    ],
)
def test_evaluate_rejects_bad_labels(cache_dir, val_digits, labels, match):
    with pytest.raises(ValueError, match=match):
        evaluate_samples(val_digits[0][:10], labels, cache_dir=cache_dir)


def test_evaluate_rejects_bad_images(cache_dir, val_digits):
    with pytest.raises(ValueError, match="32x32"):
        evaluate_samples(np.zeros((10, 16, 16), np.uint8), np.zeros(10, np.int64), cache_dir=cache_dir)
    with pytest.raises(ValueError, match="at least 2 samples"):
        evaluate_samples(val_digits[0][:1], val_digits[1][:1], cache_dir=cache_dir)
