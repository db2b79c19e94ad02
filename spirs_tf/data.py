"""Training and validation batches: pre-aligned pairs → augmentation → ``tf.data`` (FACTS A, C, D).

Pipeline
--------
:class:`PairSource` turns a manifest split into (prior, new) pairs (:func:`spirs_tf.manifest.make_pairs`)
and preprocesses every scan once (:mod:`spirs_tf.preprocess`):

* the **new** scan (the fixed image) goes onto its own working grid (RAS, ``spacing_mm``, centred on
  its brain), intensities normalised to [0, 1] with background 0;
* the **prior** scan (the moving image) and its mask are resampled onto the *new* scan's working grid,
  straight from the prior's original voxels (one resampling). The cohort is pre-aligned in world space
  (FACTS A: time points are affinely co-registered to baseline), so without augmentation the pair is
  aligned and the random augmentation affine is the exact registration target.

The arrays are kept in RAM at the full grid (images float32, masks uint8: 10 MB per scan at 128³;
a new scan shared by several pairs is stored once), and optionally in a disk cache folder of ``.npz``
files keyed by the file paths, sizes and modification times and the preprocessing settings (written
atomically, so an interrupted run never leaves a broken entry). Everything is read when the source is
built, so a bad file fails there with a :class:`~spirs_tf.errors.SpirsInputError`, not inside a
``tf.data`` worker.

:func:`make_dataset` yields one epoch of batches (the brief's batch dict, all float32): each sample is
:func:`spirs_tf.augment.augment_pair` of one pair with its own generator
``default_rng([seed, stream, epoch, index])``, so the stream is reproducible and resumable from any
epoch. Training (stream 0) visits the pairs in a fresh permutation each epoch (``default_rng([seed,
2, epoch])``; several permutations are concatenated when ``steps·batch_size`` exceeds the number of
pairs), and every batch is full. Validation (stream 1) keeps augmentation on — the authors'
validation pairs are augmented, which is what gives the affine MSE a target (FACTS C) — with one
fixed generator per pair (``[seed, 1, 0, pair]``), so every epoch sees the same batches.

``cfg.train.loader_workers`` samples are augmented concurrently in ``tf.data`` threads (SciPy's spline
filter and resampling release the GIL); ``deterministic=True`` keeps the batch order fixed.
:func:`numpy_batches` yields the same batches as NumPy dicts from a thread pool with prefetch, without
TensorFlow (the JAX backend's data path).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from spirs_tf import augment
from spirs_tf.atomic import atomic_path
from spirs_tf.errors import SpirsInputError
from spirs_tf.io import Volume, check_same_grid, read_volume
from spirs_tf.preprocess import GridMapping, normalize_intensity, preprocess_scan, to_working

#: Keys of every batch the data pipeline yields (all ``(B, S, S, S, 1)`` except ``true_affine`` ``(B, 3, 4)``);
#: the losses read :data:`spirs_tf.losses.LOSS_BATCH_KEYS` of them, the network :data:`MODEL_INPUT_KEYS`.
BATCH_KEYS = ("fixed_image", "moving_image", "moving_mask", "fixed_mask", "dice_target", "ncc_mask",
              "true_affine")
#: Inputs of the network (:func:`spirs_tf.networks.build_spirs`).
MODEL_INPUT_KEYS = ("fixed_image", "moving_image", "moving_mask")

TRAIN_STREAM, VALIDATION_STREAM, PERMUTATION_STREAM = 0, 1, 2
_CACHE_VERSION = 1


# ------------------------------------------------------------------------------ pair preprocessing
def onto_working_grid(volume: Volume, mapping: GridMapping, order: int) -> np.ndarray:
    """Resample any scan onto ``mapping``'s working grid (it need not be the scan the grid was made for).

    Returns:
        float32 array ``mapping.working_shape`` (order 1 images, 0 masks; zeros outside the scan).
    """
    other = GridMapping(mapping.working_affine, tuple(mapping.working_shape),
                        np.asarray(volume.affine, dtype=np.float64), volume.shape)
    return to_working(volume, other, order)


def prior_onto_new(prior_image: Volume, prior_mask: Volume | None, mapping: GridMapping,
                   clip_sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The prior scan on the new scan's working grid: normalised image and {0, 1} mask (zeros if none).

    Raises:
        SpirsInputError: the prior mask is not on the prior image's grid.
    """
    if prior_mask is not None:
        check_same_grid(prior_mask, prior_image)
    image = normalize_intensity(onto_working_grid(prior_image, mapping, 1), clip_sigma)
    if prior_mask is None:
        return image, np.zeros(mapping.working_shape, np.float32)
    return image, onto_working_grid(prior_mask, mapping, 0)


@dataclass(frozen=True)
class PairArrays:
    """One pre-aligned pair on the new scan's working grid (G³): images float32, masks uint8."""

    fixed_image: np.ndarray
    fixed_mask: np.ndarray
    moving_image: np.ndarray
    moving_mask: np.ndarray


def _file_stamp(path: str | None) -> list:
    if not path:
        return [None]
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


class PairSource:
    """The pre-aligned, preprocessed pairs of one manifest split, cached in RAM (module docstring).

    Args:
        manifest: a :class:`spirs_tf.manifest.Manifest`.
        split: split name (e.g. ``"train"``, ``"val"``).
        data_cfg: :class:`spirs_tf.config.DataConfig` (``grid_size``, ``spacing_mm``, ``clip_sigma``,
            ``pairing``, ``both_directions``).
        limit: keep at most this many pairs, spread evenly over the list (:func:`spread_indices`).
        cache_dir: optional folder for the on-disk cache.

    Raises:
        SpirsInputError: unreadable scans, a pair scan without a mask, masks on another grid.
    """

    def __init__(self, manifest, split: str | None, data_cfg, limit: int | None = None,
                 cache_dir: str | os.PathLike | None = None):
        from spirs_tf.manifest import make_pairs

        pairs = make_pairs(manifest, split, mode=data_cfg.pairing, both_directions=data_cfg.both_directions)
        self.pairs = [pairs[i] for i in spread_indices(len(pairs), limit)]
        self.data_cfg = data_cfg
        self.grid_size = int(data_cfg.grid_size)
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self._fixed: dict[str, dict[str, np.ndarray]] = {}
        self._items: list[PairArrays] = []
        volumes: dict[tuple[str, str], Volume] = {}

        def read(path, kind):
            key = (path, kind)
            if key not in volumes:
                volumes[key] = read_volume(path, kind)
            return volumes[key]

        for pair in self.pairs:
            for scan in (pair.prior, pair.new):
                if not scan.mask:
                    raise SpirsInputError(f"scan of patient {scan.patient_id!r} (time point {scan.timepoint}) "
                                          "has no lesion mask; training and validation pairs need one",
                                          scan.image)
            fixed = self._fixed_arrays(pair.new, read)
            moving = self._moving_arrays(pair.prior, pair.new, fixed, read)
            self._items.append(PairArrays(fixed["image"], fixed["mask"], moving["image"], moving["mask"]))
        volumes.clear()

    @classmethod
    def from_arrays(cls, pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
                    ) -> "PairSource":
        """A source over in-memory pre-aligned pairs ``(fixed, moving, fixed_mask, moving_mask)`` (G³).

        Raises:
            ValueError: shapes differ or are not cubic.
        """
        self = cls.__new__(cls)
        self.pairs, self.data_cfg, self.cache_dir, self._fixed = [], None, None, {}
        self._items = []
        for fixed, moving, fm, mm in pairs:
            shapes = {np.shape(x) for x in (fixed, moving, fm, mm)}
            if len(shapes) != 1 or len(set(np.shape(fixed))) != 1 or np.ndim(fixed) != 3:
                raise ValueError(f"pairs must be four cubic 3-D arrays of one shape, got {sorted(shapes)}")
            self._items.append(PairArrays(np.asarray(fixed, np.float32), (np.asarray(fm) > 0.5).astype(np.uint8),
                                          np.asarray(moving, np.float32), (np.asarray(mm) > 0.5).astype(np.uint8)))
        self.grid_size = int(np.shape(self._items[0].fixed_image)[0]) if self._items else 0
        return self

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> PairArrays:
        return self._items[index]

    @property
    def nbytes(self) -> int:
        """RAM held by the cached arrays (a fixed scan shared by several pairs counted once)."""
        seen, total = set(), 0
        for item in self._items:
            for a in (item.fixed_image, item.fixed_mask, item.moving_image, item.moving_mask):
                if id(a) not in seen:
                    seen.add(id(a))
                    total += a.nbytes
        return total

    # -- preprocessing with caches ------------------------------------------------------------
    def _settings(self) -> list:
        d = self.data_cfg
        return [_CACHE_VERSION, int(d.grid_size), float(d.spacing_mm), float(d.clip_sigma)]

    def _cache_file(self, key: list) -> str | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha1(json.dumps(key).encode("utf-8")).hexdigest()[:24]
        return os.path.join(self.cache_dir, f"{digest}.npz")

    def _load_cached(self, path: str | None, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
        if path is None or not os.path.isfile(path):
            return None
        try:
            with np.load(path) as z:
                return {n: z[n] for n in names}
        except (OSError, ValueError, KeyError):
            return None  # unreadable entry: recompute and overwrite

    def _store(self, path: str | None, arrays: dict[str, np.ndarray]) -> None:
        if path is None:
            return
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

    def _fixed_arrays(self, scan, read) -> dict[str, np.ndarray]:
        if scan.image in self._fixed:
            return self._fixed[scan.image]
        key = ["fixed", *_file_stamp(scan.image), *_file_stamp(scan.mask), *self._settings()]
        path = self._cache_file(key)
        arrays = self._load_cached(path, ("image", "mask", "working_affine"))
        if arrays is None:
            pre = preprocess_scan(read(scan.image, "image"), read(scan.mask, "mask"), self.data_cfg)
            arrays = {"image": pre.image, "mask": pre.mask.astype(np.uint8),
                      "working_affine": np.asarray(pre.mapping.working_affine, np.float64)}
            self._store(path, arrays)
        self._fixed[scan.image] = arrays
        return arrays

    def _moving_arrays(self, prior, new, fixed, read) -> dict[str, np.ndarray]:
        key = ["moving", *_file_stamp(prior.image), *_file_stamp(prior.mask), *_file_stamp(new.image),
               *_file_stamp(new.mask), *self._settings()]
        path = self._cache_file(key)
        arrays = self._load_cached(path, ("image", "mask"))
        if arrays is None:
            prior_image = read(prior.image, "image")
            g = self.grid_size
            mapping = GridMapping(fixed["working_affine"], (g, g, g), prior_image.affine, prior_image.shape)
            image, mask = prior_onto_new(prior_image, read(prior.mask, "mask"), mapping, self.data_cfg.clip_sigma)
            arrays = {"image": image, "mask": mask.astype(np.uint8)}
            self._store(path, arrays)
        return arrays


def spread_indices(n: int, limit: int | None) -> list[int]:
    """``limit`` indices of ``range(n)`` spread evenly (all of them when ``limit`` is None or ≥ n)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, n - 1, int(limit)).round()})


# -------------------------------------------------------------------------------------- sampling
def epoch_plan(n_pairs: int, batch_size: int, training: bool, seed: int, epoch: int = 0,
               steps: int | None = None, validation_pairs: int | None = None) -> np.ndarray:
    """The samples of one epoch: int64 rows ``(pair, stream, epoch, index)``.

    Training: ``steps`` (default ``ceil(n_pairs / batch_size)``) full batches; pair order = concatenated
    permutations drawn from ``[seed, 2, epoch]``. Validation: the first ``steps·batch_size`` of the
    (evenly spread) ``validation_pairs``, in order, with ``epoch = 0`` and ``index = pair``.

    Raises:
        ValueError: no pairs, a non-positive batch size, or a negative seed/epoch.
    """
    if n_pairs <= 0:
        raise ValueError("no pairs to build batches from")
    if batch_size <= 0 or seed < 0 or epoch < 0:
        raise ValueError(f"batch_size must be > 0 and seed, epoch >= 0; got {batch_size}, {seed}, {epoch}")
    if training:
        steps = math.ceil(n_pairs / batch_size) if steps is None else int(steps)
        total = steps * batch_size
        rng = np.random.default_rng([seed, PERMUTATION_STREAM, epoch])
        order = np.concatenate([rng.permutation(n_pairs) for _ in range(math.ceil(total / n_pairs))])[:total]
        rows = [(p, TRAIN_STREAM, epoch, k) for k, p in enumerate(order)]
    else:
        pairs = spread_indices(n_pairs, validation_pairs)
        if steps is not None:
            pairs = pairs[: int(steps) * batch_size]
        rows = [(p, VALIDATION_STREAM, 0, p) for p in pairs]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


def make_sample(source: PairSource, row: Sequence[int], seed: int, aug_cfg, out_size: int) -> dict[str, np.ndarray]:
    """Augment the pair of one plan row with its generator ``default_rng([seed, stream, epoch, index])``.

    Returns:
        the batch dict of one sample: ``(S, S, S, 1)`` float32 arrays and ``true_affine`` (3, 4).
    """
    pair, stream, epoch, index = (int(v) for v in row)
    item = source[pair]
    rng = np.random.default_rng([int(seed), stream, epoch, index])
    out = augment.augment_pair(item.fixed_image, item.moving_image, item.fixed_mask, item.moving_mask,
                               rng, aug_cfg, out_size)
    return {k: (v if k == "true_affine" else v[..., None]) for k, v in out.items()}


def input_size(cfg, levels: int) -> int:
    """Model input size ``S = grid_size / 2**(num_levels − levels)``.

    Raises:
        ValueError: ``levels`` outside ``1..num_levels``.
    """
    if not 1 <= int(levels) <= cfg.model.num_levels:
        raise ValueError(f"levels must be in 1..{cfg.model.num_levels}, got {levels}")
    return cfg.level_grid(int(levels))


def _epoch(source: PairSource, cfg, levels: int, batch_size: int, training: bool, seed: int,
           steps: int | None, epoch: int) -> tuple[int, np.ndarray, bool]:
    """``(out_size, plan, full)`` of one epoch, shared by :func:`make_dataset` and :func:`numpy_batches`:
    ``full`` = every batch is full (the partial last one of a validation plan is kept otherwise)."""
    out_size = input_size(cfg, levels)
    if len(source) and source.grid_size != cfg.data.grid_size:
        raise ValueError(f"source grid {source.grid_size} differs from cfg.data.grid_size {cfg.data.grid_size}")
    plan = epoch_plan(len(source), batch_size, training, seed, epoch, steps,
                      None if training else cfg.train.validation_pairs)
    return out_size, plan, training or len(plan) % batch_size == 0


def make_dataset(source: PairSource, cfg, levels: int, batch_size: int, training: bool, seed: int,
                 steps: int | None = None, epoch: int = 0):
    """One epoch of batches as a ``tf.data.Dataset`` of dicts (module docstring).

    Args:
        source: the pairs (full grid ``cfg.data.grid_size``).
        cfg: :class:`spirs_tf.config.SpirsConfig` (``augment``, ``train.loader_workers``,
            ``train.validation_pairs``, ``model.num_levels``).
        levels: pyramid levels of the model; batches are at ``S = grid / 2**(L − levels)``.
        batch_size: samples per batch.
        training: True → shuffled, ``steps`` full batches; False → validation (fixed augmentation).
        seed: base seed (>= 0).
        steps: batches per epoch (training default ``ceil(len(source) / batch_size)``; validation
            default all capped pairs).
        epoch: epoch number; each epoch draws new permutations and augmentations (training only).

    Returns:
        ``tf.data.Dataset`` of dicts with :data:`BATCH_KEYS`: ``(B, S, S, S, 1)`` and ``(B, 3, 4)``
        float32, static shapes (the batch dimension is static when every batch is full).
        :func:`numpy_batches` yields the same arrays without TensorFlow.

    Raises:
        ValueError: empty source, a source grid other than ``cfg.data.grid_size``, bad ``levels``.
    """
    from spirs_tf._compat import tf

    out_size, plan, full = _epoch(source, cfg, levels, batch_size, training, seed, steps, epoch)
    aug_cfg = cfg.augment

    def load(row):
        sample = make_sample(source, row, seed, aug_cfg, out_size)
        return tuple(sample[k] for k in BATCH_KEYS)

    def to_dict(row):
        values = tf.numpy_function(load, [row], [tf.float32] * len(BATCH_KEYS), stateful=False)
        out = {}
        for key, value in zip(BATCH_KEYS, values):
            value.set_shape((3, 4) if key == "true_affine" else (out_size,) * 3 + (1,))
            out[key] = value
        return out

    ds = tf.data.Dataset.from_tensor_slices(plan)
    ds = ds.map(to_dict, num_parallel_calls=max(1, int(cfg.train.loader_workers)), deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=full)
    return ds.prefetch(tf.data.AUTOTUNE)


def numpy_batches(source: PairSource, cfg, levels: int, batch_size: int, training: bool, seed: int,
                  steps: int | None = None, epoch: int = 0, workers: int | None = None, prefetch: int = 2):
    """One epoch of batches as NumPy dicts, without TensorFlow (the data path of the JAX trainer).

    The same plan, samples and batching as :func:`make_dataset` (same arguments → identical arrays,
    ``tests/test_data.py``). Samples are augmented by a pool of ``workers`` threads (default
    ``cfg.train.loader_workers``; SciPy releases the GIL), in plan order, with up to ``prefetch`` batches
    beyond the one being consumed in flight, and never fewer samples than ``workers`` (a pool wider than
    ``(prefetch + 1) · batch_size`` would otherwise sit partly idle: on the H100 machine's 16 cores, 14
    workers at batch 2 had 6 samples in flight, ``experiments/gpu/provenance/``). Stopping the iteration
    early cancels the samples not yet started.

    Yields:
        dicts with :data:`BATCH_KEYS`: ``(B, S, S, S, 1)`` and ``(B, 3, 4)`` float32 ``np.ndarray``.

    Raises:
        ValueError: as :func:`make_dataset` (raised on the first ``next``).
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    out_size, plan, full = _epoch(source, cfg, levels, batch_size, training, seed, steps, epoch)
    n_batches = len(plan) // batch_size if full else math.ceil(len(plan) / batch_size)
    rows = plan[: n_batches * batch_size] if full else plan
    aug_cfg = cfg.augment
    workers = max(1, int(cfg.train.loader_workers if workers is None else workers))

    def load(row):
        sample = make_sample(source, row, seed, aug_cfg, out_size)
        return {k: np.asarray(sample[k], np.float32) for k in BATCH_KEYS}

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spirs-data")
    pending: deque = deque()
    try:
        ahead = max((max(0, int(prefetch)) + 1) * batch_size, workers)
        queued = 0
        for start in range(0, len(rows), batch_size):
            while queued < min(len(rows), start + ahead):
                pending.append(pool.submit(load, rows[queued]))
                queued += 1
            samples = [pending.popleft().result() for _ in range(min(batch_size, len(rows) - start))]
            yield {k: np.stack([s[k] for s in samples]) for k in BATCH_KEYS}
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)


def batches(source: PairSource, cfg, levels: int, batch_size: int, training: bool, seed: int,
            steps: int | None = None, epoch: int = 0):
    """One epoch of batches for the active Keras backend: :func:`make_dataset` under TensorFlow,
    :func:`numpy_batches` otherwise (the same arrays). Arguments as :func:`make_dataset`."""
    from spirs_tf._compat import BACKEND

    make = make_dataset if BACKEND == "tensorflow" else numpy_batches
    return make(source, cfg, levels, batch_size, training, seed, steps=steps, epoch=epoch)


# ------------------------------------------------------------------------------------- inference
def prediction_inputs(prior_image: Volume, prior_mask: Volume | None, new_image: Volume, cfg,
                      levels: int | None = None, brain_mask: Volume | None = None
                      ) -> tuple[dict[str, np.ndarray], GridMapping]:
    """Network inputs for one (prior, new) pair at inference (no augmentation).

    The new scan defines the working grid (:func:`spirs_tf.preprocess.preprocess_scan`, centred on
    ``brain_mask`` when given); the prior image and mask are resampled onto it straight from their
    own voxels (pairs are pre-aligned in world space). A missing prior mask is all zeros.

    Args:
        prior_image, prior_mask, new_image: scans as read by :func:`spirs_tf.io.read_volume`.
        cfg: :class:`spirs_tf.config.SpirsConfig`.
        levels: model levels (default ``cfg.model.num_levels``: the full grid).
        brain_mask: optional brain mask on the new scan's grid.

    Returns:
        ``({"fixed_image", "moving_image", "moving_mask"}: (1, S, S, S, 1) float32, mapping)`` where
        ``mapping`` takes working-grid results back to the new scan's grid (at full resolution).

    Raises:
        SpirsInputError: masks on another grid, empty images.
    """
    out_size = input_size(cfg, cfg.model.num_levels if levels is None else levels)
    pre = preprocess_scan(new_image, None, cfg.data, brain_mask)
    image, mask = prior_onto_new(prior_image, prior_mask, pre.mapping, cfg.data.clip_sigma)
    f = cfg.data.grid_size // out_size
    arrays = {"fixed_image": pre.image, "moving_image": image, "moving_mask": mask}
    out = {k: np.ascontiguousarray(v[::f, ::f, ::f], dtype=np.float32)[None, ..., None] for k, v in arrays.items()}
    return out, pre.mapping


__all__ = ["PairSource", "PairArrays", "make_dataset", "numpy_batches", "batches", "epoch_plan", "make_sample", "input_size",
                      "prediction_inputs", "prior_onto_new", "onto_working_grid", "spread_indices",
                      "BATCH_KEYS", "MODEL_INPUT_KEYS"]
