"""SavedModel export: reloaded signature equals the Keras model, config travels with it, and
``load_predictor(saved_model)`` drives ``predict_case``."""
from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from spirs_tf import cli, config, inference

S = 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A fake run (test config, weights perturbed away from the identity initialisation) and its
    SavedModel written by ``spirs export``."""
    from spirs_tf import networks
    from spirs_tf.checkpoints import save_checkpoint

    root = tmp_path_factory.mktemp("export")
    cfg = config.get_config("test")
    model = networks.build_spirs(cfg, 3, bn_trainable=False)
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:  # non-trivial affine, DVF and segmentation outputs
        v.assign(v.numpy() + 0.05 * rng.normal(size=v.shape).astype(np.float32))
    stage = root / "run" / "stage3"
    os.makedirs(stage / "checkpoints")
    save_checkpoint(str(stage / "checkpoints" / "best.npz"), networks.model_state(model), {},
                    {"stage": 3, "levels": 3, "epoch": 1})
    config.save_config(cfg, stage / "config.json")
    out = root / "saved"
    assert cli.main(["export", "--run", str(root / "run"), "--out", str(out)]) == 0
    return root, model, cfg, out


def inputs(seed=1, batch=2):
    rng = np.random.default_rng(seed)
    x = {k: rng.random((batch, S, S, S, 1)).astype(np.float32) for k in ("new", "prior")}
    x["mask"] = (rng.random((batch, S, S, S, 1)) > 0.9).astype(np.float32)
    return x


def test_reloaded_signature_equals_keras_model(exported):
    """SavedModel and Keras agree to float32 round-off: < 1e-5 on probabilities, affine and DVF
    (measured ≤ 1e-6) and < 1e-4 on the warped volumes, where coordinate round-off (~1e-7 · |x|,
    |x| ≤ 16 voxels, from differently fused float32 ops, not deterministic across runs) meets random
    test images with gradients up to 1 per voxel (measured 3–6e-6)."""
    import tensorflow as tf

    _, model, _, out = exported
    x = inputs()
    loaded = tf.saved_model.load(str(out))
    got = loaded.signatures["serving_default"](new_image=tf.constant(x["new"]), prior_image=tf.constant(x["prior"]),
                                               prior_mask=tf.constant(x["mask"]))
    raw = model({"fixed_image": x["new"], "moving_image": x["prior"], "moving_mask": x["mask"]}, training=False)
    want = {k: np.asarray(v) for k, v in inference.serving_outputs(raw, 3).items()}
    assert set(got) == set(inference.OUTPUT_NAMES)
    shapes = {"affine": (2, 3, 4), "dvf": (2, S, S, S, 3)}
    for k in inference.OUTPUT_NAMES:
        assert got[k].shape == shapes.get(k, (2, S, S, S, 1)), k
        print(f"SavedModel vs Keras {k}: max abs diff {np.abs(got[k].numpy() - want[k]).max():.1e}")
        np.testing.assert_allclose(got[k].numpy(), want[k], atol=1e-4 if "warped" in k else 1e-5, err_msg=k)
    assert np.abs(want["affine"][:, :, :3] - np.eye(3)).max() > 1e-3  # not the identity: a real check
    assert np.abs(want["dvf"]).max() > 1e-3


def test_export_stores_config_and_refuses_to_overwrite(exported, capsys):
    import tensorflow as tf

    root, _, cfg, out = exported
    info = json.loads((out / "assets" / "spirs_info.json").read_text())
    assert config.from_dict(info["config"]) == cfg and info["outputs"] == list(inference.OUTPUT_NAMES)
    from spirs_tf.export import read_export_info

    stored = read_export_info(tf.saved_model.load(str(out)))
    assert config.from_dict(stored["config"]) == cfg and stored["levels"] == 3 and stored["input_size"] == S
    assert cli.main(["export", "--run", str(root / "run"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_saved_model_predictor_matches_checkpoint_predictor(exported, tmp_path):
    """``load_predictor(SavedModel)`` rebuilds the preprocessing from the stored config and gives the
    same case outputs as the checkpoint (max difference < 1e-4 on the new grid)."""
    root, _, _, out = exported
    shape = (20, 24, 18)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    image = ((np.sqrt((g ** 2).sum(0)) < 0.8) * (1.0 + 0.5 * np.sin(4 * g[0]) * g[1])).astype(np.float32)
    mask = ((g[0] - 0.2) ** 2 + g[1] ** 2 + g[2] ** 2 < 0.08).astype(np.uint8)
    affine = np.diag([2.5, 3.0, 3.5, 1.0])
    affine[:3, 3] = -np.array([25.0, 36.0, 31.0])
    for name, data in (("new", image), ("prior", np.roll(image, 1, axis=0)), ("mask", np.roll(mask, 1, axis=0))):
        nib.save(nib.Nifti1Image(data, affine), tmp_path / f"{name}.nii.gz")
    files = [str(tmp_path / f"{n}.nii.gz") for n in ("new", "prior", "mask")]
    saved = inference.load_predictor(str(out))
    assert saved.info["kind"] == "SavedModel" and (saved.levels, saved.size) == (3, S)
    a = inference.predict_case(saved, *files, str(tmp_path / "a"), transforms="all")
    b = inference.predict_case(inference.load_predictor(str(root / "run")), *files, str(tmp_path / "b"),
                               transforms="all")
    assert a.report["model"]["kind"] == "SavedModel"
    for name in ("prior_warped.nii.gz", "p2_prob.nii.gz", "transform_total.nii.gz"):
        x, y = (np.asarray(nib.load(tmp_path / c / name).dataobj) for c in ("a", "b"))
        print(f"SavedModel vs checkpoint predictor {name}: max abs diff {np.abs(x - y).max():.1e}")
        np.testing.assert_allclose(x, y, atol=1e-4, err_msg=name)
    assert a.report["registration"]["max_displacement_mm"] > 0.1  # a real transform was carried


def test_export_with_a_segmenter(exported, tmp_path, capsys):
    """``spirs export --segmenter``: the SavedModel's ``segment`` signature equals the Keras segmenter, the
    reloaded predictor uses it (``spirs predict --model DIR`` gives the checkpoint + segmenter's P1/P2), and
    ``--segmenter off`` exports none."""
    import dataclasses

    import tensorflow as tf

    from spirs_tf import fine_seg, fine_seg_inference
    from spirs_tf.checkpoints import save_checkpoint
    from spirs_tf.networks import model_state

    root, _, cfg, _ = exported
    seg_cfg = fine_seg.segmenter_config(cfg, 2)
    settings = fine_seg.SegmenterSettings(factor=2, extra=2, soft_prior=True)
    from spirs_tf._compat import keras

    keras.utils.set_random_seed(3)  # the layers' initial weights: the same segmenter every run
    model = fine_seg.build_segmenter(seg_cfg, settings.extra)
    rng = np.random.default_rng(3)
    for v in model.trainable_variables:
        v.assign(v.value + 0.05 * rng.standard_normal(v.shape).astype("float32"))
    seg_dir = tmp_path / "seg"
    os.makedirs(seg_dir / "checkpoints")
    config.save_config(seg_cfg, str(seg_dir / "config.json"))
    save_checkpoint(str(seg_dir / "checkpoints" / "best.npz"), model_state(model), {},
                    {"kind": "segmenter", "settings": dataclasses.asdict(settings)})
    out = tmp_path / "saved_seg"
    assert cli.main(["export", "--run", str(root / "run"), "--segmenter", str(seg_dir), "--out", str(out)]) == 0
    assert "segmenter on 64^3" in capsys.readouterr().out
    g = seg_cfg.data.grid_size
    x = [rng.random((1, g, g, g, 1)).astype(np.float32) for _ in range(3)]
    got = tf.saved_model.load(str(out)).signatures["segment"](
        fixed_image=tf.constant(x[0]), warped_image=tf.constant(x[1]), warped_mask=tf.constant(x[2]))
    keras_seg = fine_seg_inference.load_segmenter(str(seg_dir))
    want = keras_seg(*x)
    def logit(p):  # most probabilities are small (the prior bias): compare them as logits too
        p = np.asarray(p, np.float64)
        return np.log(p) - np.log1p(-p)

    for i, name in enumerate(("p1_prob", "p2_prob")):
        have = got[name].numpy()
        np.testing.assert_allclose(have, want[i], atol=1e-5, err_msg=name)
        inside = (want[i] > 1e-6) & (want[i] < 1 - 1e-4)  # float32 saturates near 0 and 1
        diff = np.abs(logit(have[inside]) - logit(want[i][inside])).max()
        print(f"SavedModel vs Keras segmenter {name}: max abs logit diff {diff:.1e}")
        assert inside.sum() > 1000 and diff < 1e-3, name
        assert np.ptp(logit(want[i][inside])) > 0.05  # not a constant: a real check
    saved = inference.load_predictor(str(out))
    assert saved.segmenter is not None and saved.segmenter.settings == settings
    assert saved.segmenter.cfg == seg_cfg

    # spirs predict with the SavedModel = the checkpoint with --segmenter (P1/P2 on the new scan's grid)
    shape = (20, 24, 18)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    image = ((np.sqrt((grid ** 2).sum(0)) < 0.8) * (1.0 + 0.5 * np.sin(4 * grid[0]) * grid[1])).astype(np.float32)
    mask = ((grid[0] - 0.2) ** 2 + grid[1] ** 2 + grid[2] ** 2 < 0.08).astype(np.uint8)
    affine = np.diag([2.5, 3.0, 3.5, 1.0])
    for name, data in (("new", image), ("prior", np.roll(image, 1, axis=0)), ("mask", np.roll(mask, 1, axis=0))):
        nib.save(nib.Nifti1Image(data, affine), tmp_path / f"{name}.nii.gz")
    base = ["predict", "--new", str(tmp_path / "new.nii.gz"), "--prior", str(tmp_path / "prior.nii.gz"),
            "--prior-mask", str(tmp_path / "mask.nii.gz"), "--refine", "off", "--quiet"]
    assert cli.main(base + ["--model", str(out), "--out", str(tmp_path / "a")]) == 0
    assert cli.main(base + ["--model", str(root / "run"), "--segmenter", str(seg_dir),
                            "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["segmentation"]["model"] == "segmenter" and report["segmentation"]["factor"] == 2
    for name in ("p1_prob.nii.gz", "p2_prob.nii.gz"):
        a, b = (np.asarray(nib.load(tmp_path / c / name).dataobj) for c in ("a", "b"))
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name)

    # refined: P2 comes from the segmenter on the refined registration, so no "P2 uses the network's
    # registration" warning (a SavedModel without a segmenter gets it)
    assert cli.main(base[:-3] + ["--refine", "affine", "--quiet", "--model", str(out),
                                 "--out", str(tmp_path / "r")]) == 0
    refined = json.loads((tmp_path / "r" / "report.json").read_text())
    assert refined["registration"]["refinement"]["p2_from"] == "refined registration"
    assert not any("P2 uses the network" in w for w in refined["registration"]["refinement"]["warnings"])

    plain = tmp_path / "saved_plain"
    assert cli.main(["export", "--run", str(root / "run"), "--segmenter", "off", "--out", str(plain)]) == 0
    assert "segment" not in tf.saved_model.load(str(plain)).signatures
    assert inference.load_predictor(str(plain)).segmenter is None


def test_export_refuses_a_bad_segmenter_in_one_line(exported, tmp_path, capsys):
    root = exported[0]
    out = tmp_path / "never"
    assert cli.main(["export", "--run", str(root / "run"), "--segmenter", str(tmp_path / "nope"),
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "segmenter not found" in err[0] and "nope" in err[0], err
    assert not out.exists()
