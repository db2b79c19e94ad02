"""spirs-tf: Sequential and Pyramidal Image Registration and Segmentation (SPIRS) in TensorFlow/Keras 3.

A faithful reimplementation of Patel et al., "A Deep Learning Based Framework for Joint Image
Registration and Segmentation of Brain Metastases on Magnetic Resonance Imaging" (SPIRS).

The package reads like the method:

* data       -- :mod:`spirs_tf.io`, :mod:`spirs_tf.preprocess`, :mod:`spirs_tf.manifest`,
                :mod:`spirs_tf.synthetic`, :mod:`spirs_tf.augment`, :mod:`spirs_tf.data`
* network    -- :mod:`spirs_tf.geometry` (NumPy), :mod:`spirs_tf.transforms` (tensor functions),
                :mod:`spirs_tf.layers`, :mod:`spirs_tf.networks`
* training   -- :mod:`spirs_tf.losses`, :mod:`spirs_tf.optim`, :mod:`spirs_tf.train` (the trainer),
                :mod:`spirs_tf.train_steps` (its compiled steps), :mod:`spirs_tf.checkpoints`,
                :mod:`spirs_tf.distribute`
* inference  -- :mod:`spirs_tf.predictor` (loading a trained model: the one way),
                :mod:`spirs_tf.inference`, :mod:`spirs_tf.cohort_predict`, :mod:`spirs_tf.export`
* evaluation -- :mod:`spirs_tf.evaluation`, :mod:`spirs_tf.metrics`, :mod:`spirs_tf.stats` (NumPy/SciPy only)

TensorFlow is imported lazily: ``import spirs_tf`` alone does not load it.
"""

__version__ = "0.1.0"

from spirs_tf.errors import SpirsInputError  # noqa: F401  (re-exported)
