import json

import pytest

from spirs_tf import config as C
from spirs_tf.errors import SpirsInputError


@pytest.mark.parametrize("name", sorted(C.NAMED_CONFIGS))
def test_named_configs_validate_and_round_trip(name, tmp_path):
    cfg = C.get_config(name)
    path = tmp_path / "cfg.json"
    C.save_config(cfg, path)
    again = C.get_config(str(path))
    assert C.to_dict(again) == C.to_dict(cfg)


def test_paper_config_matches_appendix_b():
    cfg = C.get_config("paper")
    assert cfg.model.base_filters == 64 and cfg.data.grid_size == 128
    assert (cfg.loss.gamma, cfg.loss.lambda_smooth, cfg.loss.lambda_dice) == (0.5, 0.5, 0.1)
    reg = cfg.optim.registration
    assert (reg.learning_rate, reg.learning_rate_min) == (1e-2, 4e-5)
    assert (reg.weight_decay, reg.weight_decay_min, reg.momentum) == (4e-5, 2e-7, 0.9)
    assert [s.batch_size for s in cfg.train.stages] == [32, 2, 2]
    assert [s.bn_trainable for s in cfg.train.stages] == [True, False, False]
    assert [cfg.level_grid(i) for i in (1, 2, 3)] == [32, 64, 128]


def test_overrides_are_typed_and_checked():
    cfg = C.get_config("test", ["model.base_filters=4", "train.stages.0.epochs=7", "loss.optimisation=joint"])
    assert cfg.model.base_filters == 4 and cfg.train.stages[0].epochs == 7
    assert cfg.loss.optimisation == "joint"
    with pytest.raises(SpirsInputError, match="unknown key 'base_filter'"):
        C.get_config("test", ["model.base_filter=4"])
    with pytest.raises(SpirsInputError, match="must be an integer"):
        C.get_config("test", ["model.base_filters=2.5"])
    with pytest.raises(SpirsInputError, match="divisible by 8"):
        C.get_config("test", ["data.grid_size=48"])


def test_unknown_config_and_bad_json(tmp_path):
    with pytest.raises(SpirsInputError, match="neither a named config"):
        C.get_config("nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpirsInputError, match="bad.json: not a valid JSON config"):
        C.get_config(str(bad))
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"version": 99}))
    with pytest.raises(SpirsInputError, match="newer"):
        C.get_config(str(newer))


def test_affine_supervision_field(tmp_path):
    # Eq. 1 as written stays the default of every named config (the former cpu-small demo weights used it),
    # except cpu-medium and gpu-1p5mm, built for the balanced form
    supervision = {name: C.get_config(name).loss.affine_supervision for name in C.NAMED_CONFIGS}
    assert supervision.pop("cpu-medium") == supervision.pop("gpu-1p5mm") == "displacement"
    assert set(supervision.values()) == {"matrix"}
    cfg = C.get_config("cpu-small", ["loss.affine_supervision=displacement"])
    path = tmp_path / "cfg.json"
    C.save_config(cfg, path)
    assert C.get_config(str(path)).loss.affine_supervision == "displacement"
    # a config saved before the field existed loads with the matrix MSE
    old = C.to_dict(C.get_config("cpu-small"))
    del old["loss"]["affine_supervision"]
    path.write_text(json.dumps(old))
    assert C.get_config(str(path)).loss.affine_supervision == "matrix"
    with pytest.raises(SpirsInputError, match=r"config 'test': loss.affine_supervision must be one of "
                                              r"matrix, displacement, got 'rotation'"):
        C.get_config("test", ["loss.affine_supervision=rotation"])


def test_old_config_with_a_removed_field_still_loads(tmp_path):
    """A run's config.json written before train.xla_warp was removed (it was never read) loads; any other
    unknown key stays an error."""
    data = C.to_dict(C.get_config("test"))
    assert "xla_warp" not in data["train"]
    data["train"]["xla_warp"] = True
    old = tmp_path / "config.json"
    old.write_text(json.dumps(data))
    assert C.to_dict(C.get_config(str(old))) == C.to_dict(C.get_config("test"))
    data["train"]["xla_warps"] = True
    old.write_text(json.dumps(data))
    with pytest.raises(SpirsInputError, match="unknown key.*xla_warps"):
        C.get_config(str(old))
