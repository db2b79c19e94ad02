"""The GPU training recipe: synthesise a cohort, train all three stages of a named config within a wall budget.

On the GPU machine (one command; ``experiments/gpu/README.md`` gives the exact device call)::

    bash experiments/gpu/run.sh                      # installs .whl/, KERAS_BACKEND=jax, then this script

Anywhere (a CPU check of the whole recipe in about a minute, tiny config, same outputs)::

    python experiments/gpu/recipe.py --smoke --out /tmp/gpu-smoke

Steps, each timed in ``provenance.json``:

1. ``spirs synth`` writes a pre-aligned training cohort on the config's grid and spacing with ``--workers``
   processes: the paper's mix of lesion sizes (micro lesions included), 30 % of the micro and small lesions
   already in the prior rendered faint in the new scan (a third of them vessel-like) while both masks
   still mark them, and the default share of new lesions (issue 16).
2. The train and validation pairs are preprocessed once, one process per patient
   (:func:`parallel_pair_source`), before Keras is imported.
3. Stages 1–3 train in turn (:class:`spirs_tf.train.Trainer`), each until its epochs are done or its share
   of the remaining wall budget is spent (``Trainer.fit(deadline=...)`` stops at an epoch end, or cuts an
   epoch short, and checkpoints). Stage n > 1 starts from stage n−1's best checkpoint; ``--stages`` picks
   consecutive stages and ``--init-from`` the weights the first of them starts from (an earlier call's).
4. After every stage the outputs are (re)written to ``--out`` (so a killed call still returns the stages
   it finished), all of them atomically, each below 16 MiB, at most 8 files:

   ``run.tar``          a run directory for ``experiments/make_results.sh`` / ``spirs predict --run``:
                        ``RUN/stageN/{config.json,history.csv,curves.png}`` of every stage that ran and
                        ``checkpoints/best.npz`` (model weights only) of the last of them
   ``stageN_best.npz``  the best model weights of each earlier stage (model only)
   ``curves.png``       the learning curves of all stages, one row per stage
   ``provenance.json``  config, commands, cohort, device, package versions, source digest, timings,
                        per-stage epochs/steps/stop reason/best metric
   ``recipe.log``       this script's output

5. Then ``provenance.json`` gets ``affine_accuracy``, issue 15's figures on ``--affine-eval`` held-out pairs
   (``experiments/affine_accuracy.py``, :func:`held_out`), in ``--affine-eval-seconds`` kept from training.

The weights are trained on SYNTHETIC data (``spirs synth``): not for clinical use.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # run as a script from anywhere: the package is the checkout's
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from spirs_tf import config as config_lib  # noqa: E402
from spirs_tf.atomic import atomic_path, atomic_write_text  # noqa: E402
from spirs_tf.errors import SpirsInputError  # noqa: E402

#: the most one returned file may hold (the device returns files of up to 16 MiB), and all of them together
FILE_LIMIT, TOTAL_LIMIT = 16 * 2**20 - 64 * 2**10, 60 * 2**20

#: ``spirs synth`` options of the training cohort (grid and spacing come from the config)
SYNTH_OPTIONS = ["--pose", "aligned", "--lesion-sizes", "paper", "--fade-fraction", "0.3", "--vessel-like", "0.3",
                 "--no-qc", "--quiet"]
#: the smoke run's cohort: 3 patients (one each for train, val and test), 2–3 time points, few lesions
SMOKE_SYNTH = ["--timepoints", "2-3", "--lesions", "1-3"]
#: the smoke run's config: the GPU config's stages and training choices on a 32³ grid with 2 filters
SMOKE_OVERRIDES = [
    "data.grid_size=32", "data.spacing_mm=6.0", "model.base_filters=2", "model.opening_filters=2",
    "model.affine_dense_units=8", "train.validation_pairs=2", "train.loader_workers=2",
    "train.stages.0.batch_size=2", "train.stages.0.epochs=2", "train.stages.0.steps_per_epoch=2",
    "train.stages.0.cycle_epochs=2",
    "train.stages.1.batch_size=1", "train.stages.1.epochs=1", "train.stages.1.steps_per_epoch=2",
    "train.stages.1.cycle_epochs=1",
    "train.stages.2.batch_size=1", "train.stages.2.epochs=1", "train.stages.2.steps_per_epoch=1",
    "train.stages.2.cycle_epochs=1", "train.stages.2.bn_recalibration_batches=1",
    # a 32³ grid on three levels has a 1³ bottleneck, which instance normalisation cannot normalise
    "model.normalization=batch",
]
#: what the source digest covers (the lead recomputes it with ``--print-digest`` to find the commit)
DIGEST_DIRS = ("spirs_tf", "experiments/gpu")


# ------------------------------------------------------------------------------------------ helpers
class _Tee(io.TextIOBase):
    """Write to the console and to a log file (Python-level output: this script's and the trainer's)."""

    def __init__(self, console, log):
        self.console, self.log = console, log

    def write(self, text):
        self.console.write(text)
        self.log.write(text)
        return len(text)

    def flush(self):
        self.console.flush()
        self.log.flush()


def log(message: str) -> None:
    print(f"[recipe {time.strftime('%H:%M:%S')}] {message}", flush=True)


def source_digest(root: str = ROOT) -> str:
    """sha256 over the ``.py``/``.sh``/``.txt`` files under :data:`DIGEST_DIRS` (path and content, sorted)."""
    digest = hashlib.sha256()
    for folder in DIGEST_DIRS:
        for base, dirs, files in sorted(os.walk(os.path.join(root, folder))):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith((".py", ".sh", ".txt")):
                    path = os.path.join(base, name)
                    digest.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
                    with open(path, "rb") as fh:
                        digest.update(fh.read() + b"\0")
    return digest.hexdigest()


def git_commit(root: str = ROOT) -> str | None:
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("keras", "jax", "jaxlib", "tensorflow", "numpy", "scipy", "nibabel", "nilearn", "optree"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def device_info() -> dict:
    """The Keras backend's devices (import Keras first); ``gpu`` is True when training runs on a GPU."""
    from spirs_tf._compat import BACKEND, tf

    info: dict = {"backend": BACKEND}
    if BACKEND == "jax":
        import jax

        info["devices"] = [str(d) for d in jax.devices()]
        info["gpu"] = jax.default_backend() in ("gpu", "cuda", "rocm")
        info["jax_default_matmul_precision"] = jax.config.jax_default_matmul_precision
    elif BACKEND == "tensorflow":
        gpus = tf.config.list_physical_devices("GPU")
        info["devices"] = [d.name for d in gpus] or ["CPU"]
        info["gpu"] = bool(gpus)
    else:
        info["devices"], info["gpu"] = [], False
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            info["nvidia_smi"] = smi.stdout.strip()
    return info


def _run_eagerly(backend: str) -> None:
    """Run every compiled function op by op (``--eager``)."""
    if backend == "tensorflow":
        from spirs_tf._compat import tf

        tf.config.run_functions_eagerly(True)
    elif backend == "jax":
        import jax

        jax.config.update("jax_disable_jit", True)


# ------------------------------------------------------------------------------------------ data
def _patient_pairs(job):
    """The preprocessed pairs of one patient (a worker of :func:`parallel_pair_source`)."""
    from spirs_tf.data import PairSource
    from spirs_tf.manifest import Manifest

    manifest, patient, split, data_cfg = job
    sub = Manifest(manifest.path, tuple(s for s in manifest.scans if s.patient_id == patient))
    source = PairSource(sub, split, data_cfg)
    return [(p.fixed_image, p.moving_image, p.fixed_mask, p.moving_mask) for p in (source[i] for i in range(len(source)))]


def parallel_pair_source(manifest, split: str, data_cfg, workers: int, limit: int | None = None):
    """:class:`spirs_tf.data.PairSource` of one split, preprocessed one patient per process.

    The same pairs in the same order as ``PairSource(manifest, split, data_cfg, limit)`` (patients in file
    order, then time), built ``workers`` patients at a time with forked processes (call it before
    Keras/JAX start threads). Returns ``None`` when the split is absent.
    """
    from spirs_tf.data import PairSource, spread_indices

    patients = list(manifest.patients(split))
    if not patients:
        return None
    jobs = [(manifest, p, split, data_cfg) for p in patients]
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            per_patient = pool.map(_patient_pairs, jobs, chunksize=1)
    else:
        per_patient = [_patient_pairs(job) for job in jobs]
    pairs = [pair for group in per_patient for pair in group]
    return PairSource.from_arrays([pairs[i] for i in spread_indices(len(pairs), limit)])


def synthesise(cfg, out_dir: str, patients: int, seed: int, workers: int, extra: list[str]) -> list[str]:
    """Run ``spirs synth`` for the config's grid and spacing; returns the command (argv)."""
    cmd = [sys.executable, "-m", "spirs_tf.cli", "synth", "--patients", str(patients), "--seed", str(seed),
           "--grid", str(cfg.data.grid_size), "--spacing", str(cfg.data.spacing_mm), "--workers", str(workers),
           "--out", out_dir, *SYNTH_OPTIONS, *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return cmd


def cohort_summary(cohort_dir: str) -> dict:
    """Lesion rows per size bin, status, faint and on-vessel flag of the synthetic cohort (its lesions.csv)."""
    import csv

    path = os.path.join(cohort_dir, "lesions.csv")
    if not os.path.isfile(path):
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    summary: dict = {"lesion_rows": len(rows)}  # one row per lesion and time point
    for key in ("size_bin", "status", "faint", "on_vessel"):
        if rows and key in rows[0]:
            counts: dict = {}
            for r in rows:
                counts[r[key]] = counts.get(r[key], 0) + 1
            summary[key] = counts
    return summary


# ------------------------------------------------------------------------------------------ outputs
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_only(src: str, dst: str) -> None:
    """Copy a checkpoint without its optimiser state (half the size; what evaluation and stage hand-off read)."""
    from spirs_tf.checkpoints import load_checkpoint, save_checkpoint

    state, _, meta = load_checkpoint(src)
    save_checkpoint(dst, state, {}, meta)


def combined_curves(pngs: list[str], path: str) -> None:
    """The stages' curves.png stacked into one picture (one row per stage), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    images = [mpimg.imread(p) for p in pngs if os.path.isfile(p)]
    if not images:
        return
    width = max(im.shape[1] for im in images)
    rows = [np.pad(im, ((0, 0), (0, width - im.shape[1]), (0, 0)), constant_values=1.0) for im in images]
    with atomic_path(path) as tmp:
        mpimg.imsave(tmp, np.concatenate(rows, axis=0), format="png")


def write_outputs(run_dir: str, out: str, provenance: dict, done_stages: list[int], run_name: str) -> list[str]:
    """(Re)write the outputs of the stages done so far into ``out`` (module docstring); returns their names.

    Raises:
        RuntimeError: a file over :data:`FILE_LIMIT` (the device would not return it).
    """
    from spirs_tf.checkpoints import StagePaths, stage_dir

    os.makedirs(out, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        last = max(done_stages) if done_stages else None
        tar_path = os.path.join(out, "run.tar")
        with atomic_path(tar_path) as tmp_tar, tarfile.open(tmp_tar, "w") as tar:
            for stage in done_stages:
                paths = StagePaths(stage_dir(run_dir, stage))
                for name in ("config.json", "history.csv", "curves.png"):
                    f = os.path.join(paths.root, name)
                    if os.path.isfile(f):
                        tar.add(f, arcname=f"{run_name}/stage{stage}/{name}")
                best = paths.best if os.path.isfile(paths.best) else paths.latest
                if not os.path.isfile(best):
                    continue
                slim = os.path.join(tmp, f"stage{stage}_best.npz")
                _model_only(best, slim)
                if stage == last:
                    tar.add(slim, arcname=f"{run_name}/stage{stage}/checkpoints/best.npz")
                else:
                    with atomic_path(os.path.join(out, f"stage{stage}_best.npz")) as t:
                        shutil.copyfile(slim, t)
                    written.append(f"stage{stage}_best.npz")
        written.insert(0, "run.tar")
        combined_curves([os.path.join(stage_dir(run_dir, s), "curves.png") for s in done_stages],
                        os.path.join(out, "curves.png"))
        if os.path.isfile(os.path.join(out, "curves.png")):
            written.append("curves.png")
    sizes = {name: os.path.getsize(os.path.join(out, name)) for name in written}
    provenance["outputs"] = {name: {"bytes": size} for name, size in sizes.items()}
    atomic_write_text(os.path.join(out, "provenance.json"), json.dumps(provenance, indent=2, default=str) + "\n")
    too_big = [f"{n} ({s / 2**20:.1f} MiB)" for n, s in sizes.items() if s > FILE_LIMIT]
    if too_big:
        raise RuntimeError(f"outputs over the device's 16 MiB per file: {', '.join(too_big)}; use a smaller "
                           "model (model.base_filters) or fewer outputs")
    if sum(sizes.values()) > TOTAL_LIMIT:
        raise RuntimeError(f"outputs total {sum(sizes.values()) / 2**20:.1f} MiB, over the device's 64 MiB")
    return written + ["provenance.json"]


# ------------------------------------------------------------------------------------------ training
def stage_deadlines(now: float, end: float, shares: list[float], stage: int) -> float:
    """Stage ``stage`` (1-based) ends at ``now`` + its share of the time left among the stages still to run."""
    rest = shares[stage - 1:]
    return now + max(0.0, end - now) * rest[0] / sum(rest)


def parse_stages(text: str, count: int) -> list[int]:
    """``--stages`` → the consecutive stage numbers to train, e.g. ``"2,3"`` → ``[2, 3]``.

    Raises:
        SpirsInputError: not consecutive increasing numbers in 1..count.
    """
    try:
        stages = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        stages = []
    if not stages or stages != list(range(stages[0], stages[0] + len(stages))) or not 1 <= stages[0] <= stages[-1] <= count:
        raise SpirsInputError(f"--stages needs consecutive stage numbers in 1..{count} (e.g. 1,2,3 or 3), got {text!r}")
    return stages


def train_stages(cfg, train_source, val_source, run_dir: str, train_end: float, shares: list[float],
                 provenance: dict, after_stage, verbose: int = 1, stages_to_run: list[int] | None = None,
                 init_from: str | None = None) -> list[int]:
    """Train ``stages_to_run`` (default 1..3; each from the previous stage's best, the first from
    ``init_from`` if given) until ``train_end``; returns the stages done. ``shares`` are per stage of the
    config; the stages left out give their share to the others."""
    from spirs_tf.checkpoints import StagePaths, stage_dir
    from spirs_tf.train import Trainer

    done: list[int] = []
    stages = provenance.setdefault("stages", {})
    stages_to_run = stages_to_run or list(range(1, len(cfg.train.stages) + 1))
    run_shares = [0.0] * (stages_to_run[0] - 1) + list(shares[stages_to_run[0] - 1:])
    for stage in stages_to_run:
        now = time.time()
        deadline = stage_deadlines(now, train_end, run_shares, stage)
        info = stages.setdefault(str(stage), {})
        if deadline - now < 5:
            info["stop"] = "skipped: no time left in the budget"
            log(f"stage {stage}: skipped, no time left")
            break
        start_from = init_from if stage == stages_to_run[0] else None
        if start_from is None and stage > 1:
            prev = StagePaths(stage_dir(run_dir, stage - 1))
            start_from = prev.best if os.path.isfile(prev.best) else prev.latest
        info["init_from"] = os.path.basename(start_from) if start_from else None
        started = time.time()
        trainer = Trainer(cfg, stage, train_source, val_source, run_dir, init_from=start_from, verbose=verbose)
        built = time.time()
        weights_bytes = 4 * sum(int(np.prod(v.shape)) for v in trainer.model.weights)
        provenance["weights_bytes"] = weights_bytes
        if weights_bytes > FILE_LIMIT - 2**20:  # before any training: the device would not return them
            raise SpirsInputError(f"the model's weights take {weights_bytes / 2**20:.1f} MiB, over the 15 MiB that "
                                  "one returned file may hold; lower model.base_filters")
        trainer.fit(deadline=deadline)
        finished = time.time()
        history = trainer.history
        stage_cfg = cfg.train.stages[stage - 1]
        info.update({
            "planned_epochs": stage_cfg.epochs, "epochs_done": trainer.epoch,
            "steps_per_epoch": trainer.steps_per_epoch, "batch_size": stage_cfg.batch_size,
            "steps_done": int(sum(row.get("steps", trainer.steps_per_epoch) for row in history)),
            "stop": trainer.stop_reason or "finished",
            "seconds_build": round(built - started, 2), "seconds_fit": round(finished - built, 2),
            "seconds_budget": round(deadline - now, 2),
            "epoch_seconds": [round(float(row.get("seconds", np.nan)), 2) for row in history],
            # BatchNorm re-estimation, validation, checkpoints: the part of fit outside the training loops
            "seconds_other": round(finished - built - sum(float(r.get("seconds", 0.0)) for r in history), 2),
            "best": {"metric": cfg.train.keep_best_metric, "value": trainer.best},
            "last_epoch": history[-1] if history else None,
        })
        log(f"stage {stage}: {trainer.epoch}/{stage_cfg.epochs} epochs in {finished - built:.0f} s "
            f"(stop: {info['stop']}), best {cfg.train.keep_best_metric} {trainer.best:.4f}")
        done.append(stage)
        after_stage(done)
    return done


def affine_evaluation(run_dir: str, manifest, samples: int, deadline: float) -> dict:
    """Issue 15's figures for the last stage's best weights (``experiments/affine_accuracy.py``'s
    :func:`held_out`); a failure of the measurement is returned as ``{"skipped": reason}``, not raised."""
    here = os.path.join(ROOT, "experiments")
    if here not in sys.path:
        sys.path.insert(0, here)
    import affine_accuracy

    try:
        return affine_accuracy.held_out(run_dir, manifest, samples, deadline=deadline)
    except Exception as exc:  # a measurement must not cost the trained weights their last write
        return {"skipped": f"failed: {type(exc).__name__}: {exc}"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny cohort and config (SMOKE_OVERRIDES) on any CPU, in about a minute")
    parser.add_argument("--config", default="gpu-1p5mm", help="named config or JSON file (default gpu-1p5mm)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable), applied after the smoke overrides")
    parser.add_argument("--budget", type=float, default=None,
                        help="wall seconds for the whole recipe from --t0 (default 540; smoke 150)")
    parser.add_argument("--t0", type=float, default=None,
                        help="start time (Unix seconds) the budget counts from (run.sh passes its own start)")
    parser.add_argument("--shares", default="0.25,0.25,0.5",
                        help="shares of the training time of stages 1,2,3 (unused time passes on)")
    parser.add_argument("--stages", default=None,
                        help="consecutive stages to train (default all, e.g. 1,2,3; 3 = stage 3 only, from --init-from)")
    parser.add_argument("--init-from", default=None, metavar="NPZ",
                        help="model weights the first of --stages starts from: a best.npz or stageN_best.npz of "
                             "an earlier call, carried along, so that training goes on across calls")
    parser.add_argument("--patients", type=int, default=None, help="synthetic patients (default 64; smoke 3)")
    parser.add_argument("--seed", type=int, default=2026, help="cohort seed")
    parser.add_argument("--workers", type=int, default=None, help="processes for synthesis and preprocessing "
                        "(default: the CPU count; smoke 2)")
    parser.add_argument("--work", default=None, help="folder for the cohort and the run (default: a temporary one)")
    parser.add_argument("--manifest", default=None, help="train on this manifest instead of synthesising")
    parser.add_argument("--allow-cpu", action="store_true", help="train even when the backend sees no GPU")
    parser.add_argument("--print-digest", action="store_true", help="print the source digest and exit")
    parser.add_argument("--eager", action="store_true",
                        help="run the steps op by op, uncompiled (tf.config.run_functions_eagerly / jax_disable_jit): "
                             "for the tiny smoke model on a CPU, where compiling takes longer than training")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--affine-eval", type=int, default=None, metavar="N",
                        help="after training, the affine's slope/correlation on N held-out augmented pairs "
                             "(experiments/affine_accuracy.py) into provenance.json (default 32; smoke 2; 0: none)")
    parser.add_argument("--affine-eval-seconds", type=float, default=None,
                        help="wall seconds kept from training for it (default 60; smoke 30)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_digest:
        print(source_digest())
        return 0
    t0 = args.t0 if args.t0 is not None else time.time()
    if not args.out:
        print("recipe.py: give --out or set OUT", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "recipe.log"), "a", encoding="utf-8") as log_file:
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(saved[0], log_file), _Tee(saved[1], log_file)
        try:
            return _run(args, t0)
        except SpirsInputError as exc:
            print(f"recipe.py: {exc}", file=sys.stderr)
            return 2
        finally:
            sys.stdout, sys.stderr = saved


def _run(args, t0: float) -> int:
    budget = args.budget if args.budget is not None else (150.0 if args.smoke else 540.0)
    end = t0 + budget
    workers = args.workers or (2 if args.smoke else os.cpu_count() or 1)
    overrides = (SMOKE_OVERRIDES if args.smoke else []) + list(args.overrides)
    cfg = config_lib.get_config(args.config, overrides)
    shares = [float(s) for s in args.shares.split(",")]
    if len(shares) != len(cfg.train.stages) or min(shares) <= 0:
        raise SpirsInputError(f"--shares needs {len(cfg.train.stages)} positive numbers, got {args.shares!r}")
    stages_to_run = parse_stages(args.stages, len(cfg.train.stages)) if args.stages else None
    init_from = os.path.abspath(args.init_from) if args.init_from else None
    if init_from is not None:
        from spirs_tf.checkpoints import load_checkpoint

        # unreadable: SpirsInputError (exit 2) before any work. Every stage's model holds the same variables
        # (the levels share them), so the weights of any stage can start any stage.
        _, _, init_meta = load_checkpoint(init_from)
    elif stages_to_run and stages_to_run[0] > 1:
        raise SpirsInputError(f"--stages {args.stages} starts after stage 1: give --init-from with the weights "
                              "it starts from")
    work = args.work or tempfile.mkdtemp(prefix="spirs-gpu-")
    run_dir = os.path.join(work, "run")
    provenance: dict = {
        "trained_on": "SYNTHETIC data (spirs synth); not a model of real patients; not for clinical use",
        "mode": "smoke" if args.smoke else "gpu", "config_name": cfg.name, "overrides": overrides,
        "config": config_lib.to_dict(cfg), "argv": sys.argv, "budget_seconds": budget,
        "stage_shares": shares, "git_commit": git_commit(), "source_digest": source_digest(),
        "stages_run": stages_to_run or list(range(1, len(cfg.train.stages) + 1)),
        "init_from": None if init_from is None else {"path": init_from, "sha256": _sha256(init_from),
                                                      "stage": init_meta.get("stage"), "epoch": init_meta.get("epoch")},
        "python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
        "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"), "packages": package_versions(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)), "timings": {},
    }
    timings = provenance["timings"]
    log(f"config {cfg.name} ({'smoke' if args.smoke else 'gpu'}), budget {budget:.0f} s, {workers} workers, "
        f"work folder {work}")

    # 1. the cohort
    start = time.time()
    if args.manifest:
        manifest_path = os.path.abspath(args.manifest)
        provenance["cohort"] = {"manifest": manifest_path}
    else:
        cohort = os.path.join(work, "cohort")
        manifest_path = os.path.join(cohort, "manifest.csv")
        patients = args.patients or (3 if args.smoke else 64)
        if not os.path.isfile(manifest_path):
            cmd = synthesise(cfg, cohort, patients, args.seed, workers, SMOKE_SYNTH if args.smoke else [])
        else:
            cmd = ["(reused)", manifest_path]
        provenance["cohort"] = {"command": " ".join(["spirs", *cmd[3:]]), "patients": patients,
                                **cohort_summary(cohort)}
    timings["synth"] = round(time.time() - start, 2)
    log(f"cohort ready in {timings['synth']:.1f} s: {manifest_path}")

    # 2. preprocessed pairs (forked workers: before Keras/JAX start their threads)
    from spirs_tf.manifest import load_manifest

    start = time.time()
    manifest = load_manifest(manifest_path)
    train_source = parallel_pair_source(manifest, "train", cfg.data, workers)
    val_source = parallel_pair_source(manifest, "val", cfg.data, workers, limit=cfg.train.validation_pairs)
    if train_source is None or len(train_source) == 0:
        raise SpirsInputError("no training pairs (the 'train' split needs a patient with two time points)",
                              manifest_path)
    timings["preprocess"] = round(time.time() - start, 2)
    provenance["cohort"].update(train_pairs=len(train_source), val_pairs=len(val_source or []),
                                ram_mb=round(train_source.nbytes / 2**20, 1))
    log(f"{len(train_source)} training and {len(val_source or [])} validation pairs preprocessed in "
        f"{timings['preprocess']:.1f} s")

    # 3. the device
    start = time.time()
    provenance["device"] = device_info()
    provenance["eager"] = bool(args.eager)
    if args.eager:
        _run_eagerly(provenance["device"]["backend"])
    timings["import_backend"] = round(time.time() - start, 2)
    log(f"backend {provenance['device']['backend']}, devices {provenance['device']['devices']}")
    if not provenance["device"]["gpu"] and not (args.smoke or args.allow_cpu):
        raise SpirsInputError("the Keras backend sees no GPU; this recipe would train for minutes on a CPU "
                              "(pass --allow-cpu to do it anyway)")

    # 4. the stages, outputs rewritten after each
    run_name = cfg.name
    reserve = 10.0 if args.smoke else 25.0  # for the last write of the outputs

    def after_stage(done):
        timings["total"] = round(time.time() - t0, 2)
        write_outputs(run_dir, args.out, provenance, done, run_name)

    eval_pairs = args.affine_eval if args.affine_eval is not None else (2 if args.smoke else 32)
    eval_reserve = 0.0 if eval_pairs <= 0 else (
        args.affine_eval_seconds if args.affine_eval_seconds is not None else (30.0 if args.smoke else 60.0))
    start = time.time()
    done = train_stages(cfg, train_source, val_source, run_dir, end - reserve - eval_reserve, shares, provenance,
                        after_stage, verbose=0 if args.quiet else 1, stages_to_run=stages_to_run,
                        init_from=init_from)
    timings["train"] = round(time.time() - start, 2)
    if done and eval_pairs > 0:
        # 5. issue 15's figures of the final weights, within the budget (a pair started before the end)
        start = time.time()
        acc = provenance["affine_accuracy"] = affine_evaluation(run_dir, manifest, eval_pairs, end - reserve)
        timings["affine_eval"] = round(time.time() - start, 2)
        log(f"WARNING: affine evaluation skipped: {acc['skipped']}" if "skipped" in acc else
            f"affine evaluation in {timings['affine_eval']:.0f} s: {acc['summary']}")
    timings["total"] = round(time.time() - t0, 2)
    provenance["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    written = write_outputs(run_dir, args.out, provenance, done, run_name)
    log(f"done in {timings['total']:.0f} s (budget {budget:.0f} s): stages {done}; wrote {', '.join(written)} "
        f"and recipe.log to {args.out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
