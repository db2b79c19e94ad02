"""Benchmark SPIRS against ANTs on 128³ pairs: time, peak memory and quality; training throughput; FLOPs.

Usage::

    python experiments/benchmark.py [--parts flops,forward,predict,ants,train] [--pairs 3] [--repeats 3] [--profile]
                                    [--run RUN] [--ants-paper] [--train-paper [--train-paper-stage3]]
                                    [--variants fp32,xla,xla-warp,bf16] [--work DIR] [--json OUT.json]

Data: ``--pairs`` synthetic patients (:mod:`spirs_tf.synthetic`, 128³ at 1.5 mm, ``pose="raw"``: the
head moves between time points, so the pair needs an affine and a deformable registration). Pair
``k`` is time point 0 (prior, with its lesion mask) → time point 1 (new). Files are cached in
``--work`` (default ``/tmp/spirs-benchmark``) and every method sees the same files.

Parts (each measurement runs in its own subprocess, so its peak resident memory, read from
``/proc/self/status`` VmHWM, is its own):

``flops``    FLOPs per pair of the network counted from the layer shapes (``experiments/flops.py``)
             and the float32 rate of a large matmul (NumPy and TensorFlow) → the compute floor.
``forward``  network forward only (batch 1, ``tf.function``, ``training=False``), paper width at
             128³ and ``cpu-small`` at 64³, variants: ``fp32`` (as ``spirs predict`` runs it),
             ``xla`` (``jit_compile`` on the whole model), ``xla-warp`` (only the warps compiled),
             ``bf16`` (Keras ``mixed_bfloat16``; max |difference| of every output vs fp32). One
             warm-up (trace/compile) call, then the median of ``--repeats`` calls. By default all
             four at cpu-small width and fp32, bf16 at paper width (whole-model XLA is ~20× slower
             than fp32 on this CPU; ``--variants`` runs a list at both widths).
``predict``  the whole ``spirs predict`` process per pair (interpreter start, TensorFlow import,
             model load, native scans in → case folder out), both widths.
``ants``     ANTs affine, then ANTs SyN with ANTsPy's defaults started from that affine (and with
             the paper's settings with ``--ants-paper``: ~3000 s per pair here), through
             :func:`spirs_tf.baselines.ants.register_ants`, in the Python that
             ``compare_registration.find_ants_python`` finds (``$SPIRS_ANTS_PYTHON``, this
             interpreter, or ``../venv-ants`` beside the repository; skipped with a message if none).
``train``    training steps per second on a fixed batch (augmentation excluded, measured apart),
             one warm-up step then ``--repeats`` steps, every stage of ``cpu-small``, each as a ratio
             to its FLOP floor at the matmul rate measured in the same process (with ``--profile``
             also where one step's time goes, op by op: ``experiments/train_profile.py``); paper width
             with ``--train-paper`` (stage 1 at batch ``--paper-stage1-batch``: the paper's 32 was
             killed for memory here; stage 2 30–65 s per step) and ``--train-paper-stage3``.

Quality, on the new scan's own grid for every method: Dice of the warped prior lesion mask with the
new lesion mask (lesions change between time points, so even the true transform gives < 1; its
Dice is shown), and LNCC (9³ windows, brain voxels) of the new image with the warped prior image.
Without ``--run`` SPIRS runs with untrained weights: its times are valid, its quality is not (it is
marked ``untrained``). ``--run RUN`` (a ``cpu-small`` run directory) gives trained quality numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = ("flops", "forward", "predict", "ants", "train")
VARIANTS = ("fp32", "xla", "xla-warp", "bf16")
#: forward variants run by default: whole-model XLA is ~20× slower than fp32 on this CPU at cpu-small
#: width (3-D convolutions), and the warp-only compilation gains < 5 % at paper width.
DEFAULT_VARIANTS = {"cpu-small": VARIANTS, "paper": ("fp32", "bf16")}
SHARED_NOTE = ("the machine may be shared with other jobs (see the load average): times are upper "
               "bounds of an idle machine")


# ============================================================================ worker side (subprocess)
def peak_rss_gib() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss where /proc is missing), GiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(first call seconds, seconds of ``repeats`` further calls); ``fn`` must block until done."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, times


def _build(spec):
    """Config, levels and a SPIRS model with the spec's weights (or seeded random ones, saved)."""
    from spirs_tf import checkpoints, config as config_lib, networks
    from spirs_tf._compat import keras

    cfg = config_lib.get_config(spec["config"])
    levels = cfg.model.num_levels
    if spec["variant"] == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    model = networks.build_spirs(cfg, levels, bn_trainable=False)
    weights = spec["weights"]
    if os.path.isfile(weights):
        state = checkpoints.load_checkpoint(weights)[0]
        networks.load_model_state(model, state)
    else:  # untrained: save a checkpoint + config that `spirs predict --model` can load
        os.makedirs(os.path.dirname(weights), exist_ok=True)
        checkpoints.save_checkpoint(weights, networks.model_state(model), {},
                              {"stage": len(cfg.train.stages), "levels": levels, "epoch": 0, "untrained": True})
        config_lib.save_config(cfg, os.path.join(os.path.dirname(weights), "config.json"))
    return cfg, levels, model


def worker_forward(spec: dict) -> dict:
    from spirs_tf import transforms
    from spirs_tf._compat import tf
    from spirs_tf.inference import serving_outputs

    cfg, levels, model = _build(spec)
    inputs = dict(np.load(spec["inputs"]))
    if spec["variant"] == "xla-warp":  # compile each warp on its own; the convolutions stay un-compiled
        plain = transforms.warp
        compiled = tf.function(plain, jit_compile=True, autograph=False)
        transforms.warp = lambda moving, matrix=None, dvf=None: compiled(moving, matrix, dvf)
    forward = tf.function(lambda x: serving_outputs(model(x, training=False), levels),
                          jit_compile=spec["variant"] == "xla")
    result = {}

    def run():
        result["out"] = {k: v.numpy() for k, v in forward(inputs).items()}

    first, times = _timed(run, spec["repeats"])
    out = result["out"]
    info = {"first_call_s": first, "times_s": times, "input_size": int(inputs["fixed_image"].shape[1])}
    if spec["variant"] == "fp32":
        np.savez(spec["reference"], **out)
    elif os.path.isfile(spec["reference"]):
        ref = np.load(spec["reference"])
        info["max_abs_diff"] = {k: float(np.abs(out[k].astype(np.float64) - ref[k]).max()) for k in out}
        info["mask_voxels_changed"] = int(np.sum((out["prior_mask_warped"] >= 0.5) != (ref["prior_mask_warped"] >= 0.5)))
    return info


def worker_predict(spec: dict) -> dict:
    from spirs_tf.cli import main

    rc = main(["predict", "--new", spec["new"], "--prior", spec["prior"], "--prior-mask", spec["prior_mask"],
               "--out", spec["out"], "--model", spec["model"], "--overwrite", "--quiet"])
    with open(os.path.join(spec["out"], "report.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    return {"rc": rc, "timings_s": report.get("timings_s"), "levels": report.get("model", {}).get("levels")}


def worker_train(spec: dict) -> dict:
    import tempfile

    from spirs_tf import config as config_lib, data as data_lib, train

    stage = spec["stage"]
    batch_override = [f"train.stages.{stage - 1}.batch_size={spec['batch']}"] if spec.get("batch") else []
    cfg = config_lib.get_config(spec["config"], batch_override)
    st = cfg.train.stages[stage - 1]
    arrays = np.load(spec["arrays"])
    pairs = [(arrays[f"fixed{k}"], arrays[f"moving{k}"], arrays[f"fixed_mask{k}"], arrays[f"moving_mask{k}"])
             for k in range(int(arrays["n"]))]
    source = data_lib.PairSource.from_arrays(pairs)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = train.Trainer(cfg, stage, source, None, tmp, verbose=0)
        trainer.build_steps()
        ds = data_lib.make_dataset(source, cfg, st.levels, batch_size=st.batch_size, training=True, seed=0, steps=1)
        start = time.perf_counter()
        batch = next(iter(ds))
        loader_s = time.perf_counter() - start
        first, times = _timed(lambda: float(trainer.train_step(batch)["total"]), spec["repeats"])
        sys.path.insert(0, HERE)
        import flops as flops_lib  # experiments/flops.py
        import train_profile  # experiments/train_profile.py

        # the floor of this step at the matmul rate measured now, in this process
        floor = train_profile.training_floor(cfg, st.levels, st.batch_size, flops_lib.matmul_gflops(2048, 3)["tf_gflops"])
        prof = train_profile.profile_step(lambda: trainer.train_step(batch)) if spec.get("profile") else None
    return {"levels": st.levels, "batch": st.batch_size, "input_size": cfg.level_grid(st.levels),
            "first_step_s": first, "times_s": times, "loader_batch_s": loader_s,
            "loader_workers": cfg.train.loader_workers, "floor": floor, "profile": prof}


def worker_flops(spec: dict) -> dict:
    sys.path.insert(0, HERE)
    import flops as flops_lib  # experiments/flops.py

    return flops_lib.measure(spec["configs"], spec["matmul_n"], spec["repeats"])


def worker_ants(spec: dict) -> dict:
    from spirs_tf.baselines.ants import register_ants

    d = np.load(spec["inputs"])
    init = np.load(spec["init"])["matrix"] if spec.get("init") else None
    start = time.perf_counter()
    res = register_ants(d["fixed"], d["moving"], d["moving_mask"], spacing=d["spacing"], mode=spec["mode"],
                        initial_affine=init, random_seed=1)
    call_s = time.perf_counter() - start
    extra = {"matrix": res.matrix} if res.matrix is not None else {}
    np.savez(spec["out"], warped_image=res.warped_image, warped_mask=res.warped_mask, **extra)
    return {"registration_s": res.seconds, "call_s": call_s}


WORKERS = {"forward": worker_forward, "predict": worker_predict, "train": worker_train, "flops": worker_flops,
           "ants": worker_ants}


def worker_main(kind: str, spec_json: str) -> int:
    spec = json.loads(spec_json)
    result = WORKERS[kind](spec)
    result["peak_rss_gib"] = peak_rss_gib()
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ============================================================================= parent side
def _repo_root() -> str:
    import spirs_tf

    return os.path.dirname(os.path.dirname(os.path.abspath(spirs_tf.__file__)))


def run_worker(kind: str, spec: dict, python: str | None = None, timeout: float = 1800) -> dict:
    """Run one measurement in a fresh process → its RESULT dict plus ``process_s`` (wall time of the
    whole process), or ``{"error": ...}``."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(p for p in (_repo_root(), os.environ.get("PYTHONPATH")) if p))
    cmd = [python or sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(spec)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    seconds = time.perf_counter() - start
    lines = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_s"] = seconds
    return result


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "load_average_start": os.getloadavg()}


# ------------------------------------------------------------------------------------------- data
sys.path.insert(0, HERE)
from bench_data import _read, make_pairs, model_inputs, quality, train_arrays  # noqa: E402  (experiments/)
from train_profile import format_profile  # noqa: E402


# ------------------------------------------------------------------------------------------ parts
def part_flops(args, res):
    res["flops"] = run_worker("flops", {"configs": ["paper", "cpu-small"], "matmul_n": 3072,
                                        "repeats": max(args.repeats, 3)})


def snapshot_run(run: str, work: str) -> str:
    """Copy the run's checkpoint and config (a run being trained may replace them mid-benchmark)."""
    from spirs_tf.inference import find_run_checkpoint

    ckpt, cfg, stage = find_run_checkpoint(run)
    folder = os.path.join(work, "models", "run", f"stage{stage}")
    os.makedirs(os.path.join(folder, "checkpoints"), exist_ok=True)
    shutil.copy2(cfg, os.path.join(folder, "config.json"))
    shutil.copy2(ckpt, os.path.join(folder, "checkpoints", "best.npz"))
    return os.path.join(folder, "checkpoints", "best.npz")


def _weights(args, config: str) -> tuple[str, bool]:
    """Checkpoint used for ``config`` and whether it is trained."""
    if config == "cpu-small" and args.run:
        return args.run_checkpoint, True
    return os.path.join(args.work, "models", config, "checkpoints", "untrained.npz"), False


def part_forward(args, res, pairs):
    out = res.setdefault("forward", {})
    for config in args.configs:
        weights, trained = _weights(args, config)
        inputs = model_inputs(pairs[0], config, args.work)
        for variant in args.variants or DEFAULT_VARIANTS.get(config, ("fp32",)):
            spec = {"config": config, "variant": variant, "weights": weights, "inputs": inputs,
                    "repeats": args.repeats, "reference": os.path.join(args.work, f"reference_{config}.npz")}
            print(f"  forward {config} {variant} ...", flush=True)
            out[f"{config}/{variant}"] = dict(run_worker("forward", spec, timeout=args.timeout), trained=trained)


def part_predict(args, res, pairs):
    out = res.setdefault("predict", {})
    for config in args.configs:
        weights, trained = _weights(args, config)
        model = weights
        if not os.path.isfile(weights):  # the forward part writes the untrained checkpoint
            run_worker("forward", {"config": config, "variant": "fp32", "weights": weights, "repeats": 0,
                                   "inputs": model_inputs(pairs[0], config, args.work),
                                   "reference": os.path.join(args.work, f"reference_{config}.npz")})
        rows = []
        for pair in pairs:
            case = os.path.join(args.work, "predict", config, pair["name"])
            print(f"  spirs predict {config} {pair['name']} ...", flush=True)
            r = run_worker("predict", {"new": pair["new_image"], "prior": pair["prior_image"],
                                       "prior_mask": pair["prior_mask"], "out": case, "model": model},
                           timeout=args.timeout)
            if "error" not in r:
                r.update(quality(pair, _read(os.path.join(case, "prior_warped.nii.gz"))[0],
                                 _read(os.path.join(case, "prior_mask_warped.nii.gz"), "mask")[0]))
            rows.append(r)
        out[config] = {"trained": trained, "pairs": rows}


def part_ants(args, res, pairs):
    from spirs_tf.preprocess import normalize_intensity

    sys.path.insert(0, HERE)
    from compare_registration import find_ants_python  # experiments/compare_registration.py

    python = find_ants_python()
    if python is None:
        res["ants"] = {"skipped": "no Python with antspyx ($SPIRS_ANTS_PYTHON, this interpreter, ../venv-ants "
                                  "beside the repository; pip install 'spirs-tf[baselines]')"}
        return
    modes = ["affine", "syn-default"] + (["syn-paper"] if args.ants_paper else [])
    out = res.setdefault("ants", {"python": python, "threads": "ANTs/ITK default (all cores)"})
    for mode in modes:
        out[mode] = []
    for pair in pairs:
        folder = os.path.join(args.work, "ants", pair["name"])
        os.makedirs(folder, exist_ok=True)
        inputs = os.path.join(folder, "inputs.npz")
        new, affine = _read(pair["new_image"])
        np.savez(inputs, fixed=normalize_intensity(new.astype(np.float32)),
                 moving=normalize_intensity(_read(pair["prior_image"])[0].astype(np.float32)),
                 moving_mask=(_read(pair["prior_mask"], "mask")[0] > 0).astype(np.float32),
                 spacing=np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        for mode in modes:
            print(f"  ANTs {mode} {pair['name']} ...", flush=True)
            spec = {"inputs": inputs, "mode": mode, "out": os.path.join(folder, f"{mode}.npz"),
                    "init": None if mode == "affine" else os.path.join(folder, "affine.npz")}
            r = run_worker("ants", spec, python=python, timeout=args.ants_timeout if mode == "syn-paper" else args.timeout)
            if "error" not in r:
                d = np.load(spec["out"])
                r.update(quality(pair, d["warped_image"], d["warped_mask"]))
            out[mode].append(r)


def part_train(args, res, pairs):
    out = res.setdefault("train", {})
    from spirs_tf import config as config_lib

    for config in args.configs:
        arrays = train_arrays(pairs, config, args.work)
        for stage in range(1, len(config_lib.get_config(config).train.stages) + 1):
            key = f"{config}/stage{stage}"
            if config == "paper" and not args.train_paper:
                out[key] = {"skipped": "paper-width training is opt-in: --train-paper"}
                continue
            if config == "paper" and stage == 3 and not args.train_paper_stage3:
                out[key] = {"skipped": "128³ × batch 2 training: --train-paper-stage3"}
                continue
            print(f"  train {config} stage {stage} ...", flush=True)
            spec = {"config": config, "stage": stage, "arrays": arrays, "repeats": args.repeats,
                    "profile": args.profile}
            if config == "paper" and stage == 1:
                spec["batch"] = args.paper_stage1_batch
            out[key] = run_worker("train", spec, timeout=args.timeout)


# ------------------------------------------------------------------------------------------ report
def _median(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return statistics.median(values) if values else float("nan")


def _mean(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def summarize(res: dict, pairs: list[dict]) -> list[str]:
    lines = []
    m = res["machine"]
    lines += [f"SPIRS benchmark: {m['cpu']}, {m['cpu_count']} CPUs, load average "
              f"{m['load_average_start'][0]:.1f} at start / {m.get('load_average_end', [float('nan')])[0]:.1f} "
              f"at end; {SHARED_NOTE}.", ""]
    rows = []
    base = [quality(p, _read(p["prior_image"])[0], _read(p["prior_mask"], "mask")[0]) for p in pairs]
    truth = [quality(p, None, np.load(p["truth"])) for p in pairs]
    rows.append(("identity (no registration)", None, None, _mean([b["dice"] for b in base]),
                 _mean([b["lncc"] for b in base]), ""))
    rows.append(("true transform (synthetic ground truth)", None, None, _mean([t["dice"] for t in truth]), None, ""))
    spirs_time = {}
    for config, r in res.get("predict", {}).items():
        ok = [p for p in r["pairs"] if "error" not in p]
        note = "" if r["trained"] else "untrained: quality n/a"
        if len(ok) < len(r["pairs"]):
            note += f" {len(r['pairs']) - len(ok)} failed: {next(p['error'] for p in r['pairs'] if 'error' in p)}"
        spirs_time[config] = _median([p["process_s"] for p in ok])
        rows.append((f"SPIRS {config}: spirs predict, whole process", spirs_time[config],
                     max((p["peak_rss_gib"] for p in ok), default=None),
                     _mean([p["dice"] for p in ok]) if r["trained"] else None,
                     _mean([p["lncc"] for p in ok]) if r["trained"] else None, note.strip()))
        rows.append((f"SPIRS {config}: network in spirs predict (incl. trace)", _median([p["timings_s"]["network"] for p in ok]),
                     None, None, None, ""))
    for config in ("paper", "cpu-small"):
        f = res.get("forward", {}).get(f"{config}/fp32")
        if f and "error" not in f:
            rows.append((f"SPIRS {config}: network forward only ({f['input_size']}³)", _median(f["times_s"]),
                         f["peak_rss_gib"], None, None, ""))
    ants = res.get("ants", {})
    ants_time = {}
    for mode, label in (("affine", "ANTs affine"), ("syn-default", "ANTs SyN defaults (from ANTs affine)"),
                        ("syn-paper", "ANTs SyN paper settings (from ANTs affine)")):
        runs = [r for r in ants.get(mode, []) if "error" not in r]
        if not runs:
            continue
        ants_time[mode] = _median([r["registration_s"] for r in runs])
        rows.append((label, ants_time[mode], max(r["peak_rss_gib"] for r in runs), _mean([r["dice"] for r in runs]),
                     _mean([r["lncc"] for r in runs]), f"process {_median([r['process_s'] for r in runs]):.1f} s"))
    if "affine" in ants_time and "syn-default" in ants_time:
        both = [a["registration_s"] + s["registration_s"] for a, s in zip(ants["affine"], ants["syn-default"])
                if "error" not in a and "error" not in s]
        ants_time["affine+syn-default"] = _median(both)
        rows.append(("ANTs affine + SyN defaults", ants_time["affine+syn-default"], None, None, None, ""))
    lines.append(f"Registration of {len(pairs)} synthetic 128³ pairs at 1.5 mm (raw head pose); time = median "
                 "per pair; Dice/LNCC = mean over pairs")
    lines.append(f"  {'method':52s} {'time s':>8s} {'peak GiB':>9s} {'Dice':>6s} {'LNCC':>6s}  note")
    fmt = lambda v, f: (f"{v:{f}}" if v is not None and np.isfinite(v) else "-")  # noqa: E731
    for name, t, mem, dice, lncc, note in rows:
        lines.append(f"  {name:52s} {fmt(t, '8.2f'):>8s} {fmt(mem, '9.2f'):>9s} {fmt(dice, '6.3f'):>6s} "
                     f"{fmt(lncc, '6.3f'):>6s}  {note}")
    for config, t in spirs_time.items():
        for key in ("syn-default", "affine+syn-default"):
            if key in ants_time:
                lines.append(f"  ratio SPIRS {config} spirs predict / ANTs {key}: {t / ants_time[key]:.2f}")
        res.setdefault("ratios", {})[config] = {k: t / v for k, v in ants_time.items()}
    if "skipped" in ants:
        lines.append(f"  ANTs skipped: {ants['skipped']}")
    lines.append("")

    fwd = res.get("forward", {})
    if fwd:
        lines.append("Network forward, batch 1 (one warm-up call, then median of the repeats)")
        lines.append(f"  {'config/variant':22s} {'input':>6s} {'warm-up s':>10s} {'forward s':>10s} {'peak GiB':>9s}  "
                     "max |out − fp32| (prob, dvf vox, warped image); mask voxels changed")
        for key, f in fwd.items():
            if "error" in f:
                lines.append(f"  {key:22s} failed: {f['error']}")
                continue
            d = f.get("max_abs_diff")
            diff = (f"{max(d['p1_prob'], d['p2_prob']):.2e}, {d['dvf']:.2e}, {d['prior_warped']:.2e}; "
                    f"{f['mask_voxels_changed']}") if d else "reference"
            lines.append(f"  {key:22s} {f['input_size']:>5d}³ {f['first_call_s']:10.2f} {_median(f['times_s']):10.2f} "
                         f"{f['peak_rss_gib']:9.2f}  {diff}")
        weights = {k.split('/')[0]: v.get("trained") for k, v in fwd.items()}
        lines.append("  weights: " + ", ".join(f"{k} {'trained' if v else 'untrained (timing only)'}"
                                              for k, v in weights.items()))
        lines.append("")

    fl = res.get("flops")
    if fl and "error" not in fl:
        rate = max(fl["numpy_gflops"], fl["tf_gflops"])
        lines.append(f"FLOPs per pair (counted from layer shapes) and the compute floor at the float32 matmul rate "
                     f"(n={fl['matmul_n']}: NumPy {fl['numpy_gflops']:.0f} GFLOP/s, TensorFlow {fl['tf_gflops']:.0f} "
                     f"GFLOP/s)")
        for config, c in fl["counts"].items():
            passes = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in c["by_pass"].items())
            floor = c["total"] / (rate * 1e9)
            f = fwd.get(f"{config}/fp32", {})
            measured = _median(f["times_s"]) if "times_s" in f else float("nan")
            lines.append(f"  {config:10s} {c['total'] / 1e9:8.1f} GFLOP ({passes}); floor {floor:.2f} s; "
                         f"measured fp32 forward {measured:.2f} s = {measured / floor:.1f}× the floor")
        lines.append("")
    elif fl:
        lines.append(f"FLOPs failed: {fl['error']}")

    tr = res.get("train", {})
    if tr:
        lines.append("Training throughput (fixed batch, augmentation excluded; one warm-up step, median of the repeats)")
        lines.append(f"  {'config/stage':18s} {'levels':>6s} {'input':>6s} {'batch':>5s} {'step s':>8s} {'pairs/s':>8s} "
                     f"{'floor s':>8s} {'× floor':>8s} {'loader pairs/s':>15s} {'peak GiB':>9s}")
        profiles = []
        for key, t in tr.items():
            if "skipped" in t or "error" in t:
                lines.append(f"  {key:18s} {t.get('skipped') or 'failed: ' + t['error']}")
                continue
            step, floor = _median(t["times_s"]), t["floor"]["floor_s"]
            lines.append(f"  {key:18s} {t['levels']:>6d} {t['input_size']:>5d}³ {t['batch']:>5d} {step:8.2f} "
                         f"{t['batch'] / step:8.3f} {floor:8.3f} {step / floor:8.1f} "
                         f"{t['batch'] / t['loader_batch_s']:15.2f} {t['peak_rss_gib']:9.2f}")
            if t.get("profile"):
                profiles += ["", f"Profile of one {key} training step (tf.profiler)"] + format_profile(t["profile"])
        lines.append("  loader pairs/s: augmentation of one batch with train.loader_workers threads (first batch, "
                     "includes tf.data start-up)")
        lines.append("  floor: 3 × forward FLOPs (layer shapes, experiments/flops.py) × batch at the float32 matmul rate "
                     "measured in the same process; × floor = step / floor")
        lines += profiles
    return lines


# -------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1], argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--configs", default="paper,cpu-small", help="network widths (default paper,cpu-small)")
    parser.add_argument("--variants", default=None,
                        help=f"forward variants, fp32 first, among {','.join(VARIANTS)} (default: all for "
                             "cpu-small, fp32,bf16 for paper)")
    parser.add_argument("--pairs", type=int, default=3, help="synthetic pairs (default 3; medians over pairs)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward calls / training steps (>= 3)")
    parser.add_argument("--seed", type=int, default=11, help="synthetic cohort seed")
    parser.add_argument("--run", default=None, help="trained cpu-small run directory (quality numbers)")
    parser.add_argument("--ants-paper", action="store_true", help="also ANTs SyN with the paper's settings (~1 h/pair)")
    parser.add_argument("--train-paper", action="store_true",
                        help="also time paper-width training: stage 1 at --paper-stage1-batch, stage 2 (64³, batch 2; "
                             "30–65 s per step here)")
    parser.add_argument("--paper-stage1-batch", type=int, default=4,
                        help="paper stage-1 batch for --train-paper (the paper's 32 needs > 20 GB; default 4)")
    parser.add_argument("--train-paper-stage3", action="store_true", help="with --train-paper: also stage 3 (128³, batch 2)")
    parser.add_argument("--profile", action="store_true",
                        help="with the train part: the op-by-op profile of one step of every stage (experiments/train_profile.py)")
    parser.add_argument("--work", default=os.path.join("/tmp", "spirs-benchmark"), help="cache and output folder")
    parser.add_argument("--json", default=None, help="result JSON (default WORK/benchmark.json)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement process")
    parser.add_argument("--ants-timeout", type=float, default=4 * 3600, help="seconds per ANTs paper-SyN run")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or args.repeats < 3 or args.pairs < 1:
        parser.error(f"unknown parts {unknown}" if unknown else "--repeats must be >= 3 and --pairs >= 1")
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    if args.variants and (args.variants[:1] != ["fp32"] or set(args.variants) - set(VARIANTS)):
        parser.error(f"--variants must start with fp32 and be among {','.join(VARIANTS)}")
    if args.run and not os.path.isdir(args.run):
        parser.error(f"--run {args.run}: not a directory")
    os.makedirs(args.work, exist_ok=True)
    if args.run:
        args.run_checkpoint = snapshot_run(args.run, args.work)

    res = {"command": "python experiments/benchmark.py " + " ".join(argv), "machine": machine_info(),
           "note": SHARED_NOTE, "parts": parts, "pairs": args.pairs, "repeats": args.repeats,
           "run": args.run, "run_checkpoint": getattr(args, "run_checkpoint", None)}
    start = time.perf_counter()
    print(f"generating/reading {args.pairs} synthetic 128³ pairs in {args.work} ...", flush=True)
    pairs = make_pairs(args.work, args.pairs, args.seed)
    for part in PARTS:
        if part in parts:
            print(f"[{part}]", flush=True)
            {"flops": lambda: part_flops(args, res), "forward": lambda: part_forward(args, res, pairs),
             "predict": lambda: part_predict(args, res, pairs), "ants": lambda: part_ants(args, res, pairs),
             "train": lambda: part_train(args, res, pairs)}[part]()
    res["machine"]["load_average_end"] = os.getloadavg()
    res["total_s"] = time.perf_counter() - start
    lines = summarize(res, pairs)
    lines.append(f"total benchmark time {res['total_s'] / 60:.1f} min; command: {res['command']}")
    print("\n".join(lines))
    res["table"] = lines
    from spirs_tf.atomic import atomic_write_text

    path = args.json or os.path.join(args.work, "benchmark.json")
    atomic_write_text(path, json.dumps(res, indent=2, default=float) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
