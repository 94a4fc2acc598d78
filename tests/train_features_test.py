"""`tf-dpfair-train --cache_features`: a linear probe trained on cached backbone features."""

import glob
import json
import os

import numpy as np
import pytest

from experiment_fixtures import TINY
from tf_dpfair.experiments import settings_lib
from tf_dpfair.experiments import train_lib

PROBE = {**TINY, "model": "efficientnet_lite0", "model_options": {"image_size": 32},
         "finetune": "head", "epsilon": 3.0, "steps": 4, "ema_decay": 0.0,
         "learning_rate": 2.0}


def run(work_dir, **overrides):
    settings = settings_lib.settings_from(overrides={**PROBE, "work_dir": str(work_dir),
                                                     **overrides})
    return train_lib.run(settings, verbose=0)


def scores(work_dir):
    with np.load(os.path.join(work_dir, "predictions.npz")) as saved:
        return saved["scores_raw"]


@pytest.mark.slow
def test_cached_run_gives_the_uncached_run(tmp_path, capsys):
    plain = run(tmp_path / "plain")
    cache = tmp_path / "cache"
    cached = run(tmp_path / "cached", cache_features=True, feature_cache_dir=str(cache))
    # The same private run: statement, updates and test predictions.
    assert cached["privacy"]["epsilon"] == plain["privacy"]["epsilon"]
    assert cached["privacy"]["statement"] == plain["privacy"]["statement"]
    assert cached["training"]["total_steps"] == plain["training"]["total_steps"] == 4
    np.testing.assert_allclose(scores(tmp_path / "cached"), scores(tmp_path / "plain"),
                               atol=1e-5)
    assert np.ptp(scores(tmp_path / "plain")) > 0  # the head moved
    record = cached["training"]["cached_features"]
    assert record["views_per_training_example"] == 1
    assert sorted(record["files"]) == ["test", "train"]
    assert plain["training"]["cached_features"] is None
    files = sorted(glob.glob(str(cache / "*.npz")))
    assert len(files) == 2
    stamps = [os.path.getmtime(f) for f in files]
    capsys.readouterr()
    # Another learning rate: the same data and backbone, so the cache is read.
    run(tmp_path / "other", cache_features=True, feature_cache_dir=str(cache),
        learning_rate=0.5)
    assert capsys.readouterr().out.count("read from") == 2
    assert [os.path.getmtime(f) for f in files] == stamps
    # Another seed draws other data: new files beside the old ones.
    run(tmp_path / "seed", cache_features=True, feature_cache_dir=str(cache), seed=1)
    assert len(glob.glob(str(cache / "*.npz"))) == 4
    with open(tmp_path / "cached" / "settings.json") as f:
        assert json.load(f)["cache_features"] is True
    with open(tmp_path / "plain" / "settings.json") as f:
        assert "cache_features" not in json.load(f)


def test_cache_settings_are_checked():
    with pytest.raises(ValueError, match="finetune='head'"):
        settings_lib.settings_from(overrides={**PROBE, "finetune": "all",
                                              "cache_features": True})
    with pytest.raises(ValueError, match="needs cache_features=True"):
        settings_lib.settings_from(overrides={**PROBE, "feature_cache_dir": "/tmp/x"})
    with pytest.raises(ValueError, match="one machine"):
        settings_lib.settings_from(overrides={**PROBE, "cache_features": True,
                                              "strategy": "multi_worker"})
