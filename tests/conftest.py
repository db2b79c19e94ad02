"""Shared fixtures. Tests use tiny volumes (16³–32³) and few filters; slow ones are marked ``slow``."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A fake run: a randomly initialised test-config model (identity affine, zero DVF) in stage3/."""
    from cohort import make_fake_run

    return make_fake_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def predictor(run_dir):
    """The :class:`spirs_tf.inference.Predictor` of :func:`run_dir`."""
    from spirs_tf import inference

    return inference.load_predictor(run_dir)
