"""Synthetic longitudinal brain-metastasis MRI with exact ground truth (``spirs synth``).

Built on nilearn's shipped MNI152 2009 template (no download). Per patient: an anatomically varied brain
(:mod:`~spirs_tf.synthetic.anatomy`, :mod:`~spirs_tf.synthetic.vessels`), 1–20 metastases with size,
shape, enhancement, edema, mass effect and a trajectory over 3–6 time points
(:mod:`~spirs_tf.synthetic.lesions`), and per time point a scan with its own head position, bias,
gamma and Rician noise (:mod:`~spirs_tf.synthetic.scanner`, :mod:`~spirs_tf.synthetic.render`).

Teaching the prior (off by default, :func:`~spirs_tf.synthetic.lesions.sample_fading`): with
``SynthConfig.fade_fraction`` (``spirs synth --fade-fraction``) a lesion present in the prior and the new scan
is rendered *faded* in the new scan (its contrast × ``fade_contrast``) while both masks still mark it, as in a
clinician-edited prior; ``vessel_like_fraction`` puts some of them on a small vessel so that they look like
one; ``new_lesion_fraction`` sets the share of *new* lesions, absent from every earlier scan (no prior).
``lesions.csv`` records each lesion's ``contrast`` and ``on_vessel`` per time point. Fading draws from its
own random stream: at the defaults every scan is what it was before these options existed.

Pose modes:

* ``pose="raw"`` (default): every time point gets a random head repositioning (rigid ±10°, ±10 mm plus
  an affine of at most 3 % scale/shear) applied to the array; the scanner grid (affine) stays the same,
  so consecutive scans are *not* aligned and the true transform holds the composed pose.
* ``pose="aligned"``: no repositioning, as after the usual preprocessing that co-registers every time
  point to the baseline; the training pipeline expects such pairs. The true transform is then the
  identity plus the mass-effect displacement around lesions that changed.

Ground truth per consecutive pair (prior ``t``, new ``t + 1``): the 4×4 world-mm affine ``A`` mapping
new-scan world coordinates to prior-scan world coordinates, and a displacement ``d`` (mm, RAS axes, on the
new scan's grid) with ``prior_world = A · new_world + d``; see :mod:`~spirs_tf.synthetic.render` for the
derivation and :mod:`~spirs_tf.synthetic.cohort` for the file layout.
"""
from spirs_tf.synthetic.cohort import (SynthConfig, SynthPatient, assign_splits, generate_patient,
                                       synthesize_cohort, write_patient)
from spirs_tf.synthetic.lesions import SIZE_BINS, sample_fading, sample_lesion_volumes, size_bin
from spirs_tf.synthetic.render import PairTransform, SynthScan

__all__ = ["SynthConfig", "SynthPatient", "SynthScan", "PairTransform", "SIZE_BINS", "assign_splits",
           "generate_patient", "synthesize_cohort", "write_patient", "sample_fading", "sample_lesion_volumes",
           "size_bin"]
