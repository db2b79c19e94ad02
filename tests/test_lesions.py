"""Lesion change table on hand-made masks: every change class, thresholds, volumes, centroids, CSV."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from spirs_tf import lesions

SPACING = (1.0, 2.0, 1.5)  # voxel volume 3 mm³


def grid_affine():
    a = np.diag(list(SPACING) + [1.0])
    a[:3, 3] = [-10.0, 5.0, 2.0]
    return a


def box(arr, lo, size, value=1):
    arr[tuple(slice(l, l + s) for l, s in zip(lo, size))] = value


@pytest.fixture
def case():
    """P2 mask and carried prior labels with one lesion of each change class."""
    shape = (40, 30, 30)
    p2 = np.zeros(shape, np.uint8)
    prior = np.zeros(shape, np.int32)
    box(prior, (2, 2, 2), (3, 3, 3), 1)      # 27 vox → P2 48 vox: growing (1.78)
    box(p2, (2, 2, 2), (4, 4, 3))
    box(prior, (10, 2, 2), (3, 3, 3), 2)     # 27 → 18: shrinking (0.67)
    box(p2, (10, 2, 2), (3, 3, 2))
    box(prior, (18, 2, 2), (3, 3, 3), 3)     # 27 → 27 shifted by one voxel: stable
    box(p2, (19, 2, 2), (3, 3, 3))
    box(p2, (30, 20, 20), (2, 2, 2))         # no prior: new
    box(prior, (2, 20, 20), (3, 3, 3), 5)    # nothing on P2: resolved
    box(prior, (10, 20, 2), (4, 4, 4), 6)    # 64 vox; P2 lesion covers 48 of it ...
    box(prior, (14, 20, 2), (2, 4, 4), 7)    # ... and all 32 of this one: 7 merged into 6
    box(p2, (11, 20, 2), (5, 4, 4))          # 80 vox: ratio 80/64 = 1.25 exactly → stable (strict >)
    box(prior, (2, 10, 20), (5, 2, 1), 9)    # 10 vox → P2 8 vox: ratio 0.8 exactly → stable
    box(p2, (2, 10, 20), (4, 2, 1))
    return p2, prior


def by_change(rows):
    return {(r["source"], r["change"], r["prior_lesion_id"]) for r in rows}


def test_every_change_class(case):
    p2, prior = case
    rows = lesions.lesion_changes(p2, prior, SPACING, grid_affine())
    assert [r["source"] for r in rows] == ["p2"] * 6 + ["prior"] * 2
    assert [r["row"] for r in rows] == list(range(1, 9))
    assert by_change(rows) == {("p2", "growing", 1), ("p2", "shrinking", 2), ("p2", "stable", 3),
                               ("p2", "new", None), ("p2", "stable", 6), ("p2", "stable", 9),
                               ("prior", "resolved", 5), ("prior", "merged", 7)}
    counts = lesions.change_counts(rows)
    assert counts == {"new": 1, "growing": 1, "shrinking": 1, "stable": 3, "resolved": 1, "merged": 1}
    growing = next(r for r in rows if r["change"] == "growing")
    assert growing["volume_mm3"] == 48 * 3.0 and growing["prior_volume_mm3"] == 27 * 3.0
    assert growing["volume_ratio"] == pytest.approx(48 / 27) and growing["size_bin"] == "medium"
    new = next(r for r in rows if r["change"] == "new")
    assert new["volume_mm3"] == 24.0 and new["size_bin"] == "micro" and new["volume_ratio"] is None
    resolved = next(r for r in rows if r["change"] == "resolved")
    assert resolved["lesion_id"] is None and resolved["volume_mm3"] == 0 and resolved["prior_volume_mm3"] == 81.0
    assert resolved["size_bin"] == "small"


def test_centroids_are_world_ras_means(case):
    p2, prior = case
    affine = grid_affine()
    affine[:3, :3] = affine[:3, :3] @ np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]])  # non-RAS storage
    rows = lesions.lesion_changes(p2, prior, SPACING, affine)
    from scipy import ndimage

    labels, _ = ndimage.label(p2, structure=np.ones((3, 3, 3)))
    for r in rows:
        region = labels == r["lesion_id"] if r["source"] == "p2" else prior == r["prior_lesion_id"]
        idx = np.argwhere(region).T
        world = (affine[:3, :3] @ idx + affine[:3, 3:4]).mean(axis=1)
        np.testing.assert_allclose([r["centroid_x_mm"], r["centroid_y_mm"], r["centroid_z_mm"]], world, atol=1e-9)


def test_diagonal_contact_is_one_lesion_and_largest_overlap_wins():
    p2 = np.zeros((10, 10, 10), np.uint8)
    p2[2, 2, 2] = p2[3, 3, 3] = 1  # touch at a corner: one 26-connected lesion
    prior = np.zeros((10, 10, 10), np.int32)
    prior[2, 2, 2] = 4
    prior[3, 3, 3] = 2
    prior[3, 3, 4] = 2
    rows = lesions.lesion_changes(p2, prior, (1, 1, 1), np.eye(4))
    assert len([r for r in rows if r["source"] == "p2"]) == 1
    # tie on overlap (1 voxel each) → smallest id; the other one merged
    assert rows[0]["prior_lesion_id"] == 2 and rows[1]["change"] == "merged" and rows[1]["prior_lesion_id"] == 4


def test_empty_inputs_and_bad_shapes():
    z = np.zeros((4, 4, 4))
    assert lesions.lesion_changes(z, z.astype(int), (1, 1, 1), np.eye(4)) == []
    with pytest.raises(ValueError, match="same 3-D shape"):
        lesions.lesion_changes(z, np.zeros((4, 4, 5), int), (1, 1, 1), np.eye(4))
    with pytest.raises(ValueError, match="spacing"):
        lesions.lesion_changes(z, z.astype(int), (1, 0, 1), np.eye(4))


def test_classify_thresholds():
    assert lesions.classify_change(10.0, None) == "new"
    assert lesions.classify_change(12.6, 10.0) == "growing"
    assert lesions.classify_change(12.5, 10.0) == "stable"
    assert lesions.classify_change(8.0, 10.0) == "stable"
    assert lesions.classify_change(7.9, 10.0) == "shrinking"


def test_csv_round_trip(case, tmp_path):
    p2, prior = case
    rows = lesions.lesion_changes(p2, prior, SPACING, grid_affine())
    lesions.write_lesions_csv(str(tmp_path / "lesions.csv"), rows)
    with open(tmp_path / "lesions.csv") as fh:
        back = list(csv.DictReader(fh))
    assert tuple(back[0]) == lesions.COLUMNS and len(back) == len(rows)
    for r, b in zip(rows, back):
        assert b["change"] == r["change"]
        assert float(b["volume_mm3"]) == pytest.approx(r["volume_mm3"], abs=1e-4)
        assert (b["volume_ratio"] == "") == (r["volume_ratio"] is None)
