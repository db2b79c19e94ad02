"""Keras layers: thin adapters over :mod:`spirs_tf.transforms` (one call each, no weights), and
:class:`OpeningConv3D`, a ``Conv3D`` evaluated fast on a CPU.

Every layer is registered for serialization (``package="spirs_tf"``) and round-trips through
``get_config`` / ``from_config`` and ``model.save(...)`` / ``keras.models.load_model(...)``.

Layers that produce coordinates, affines, displacement fields or warped volumes default to the
``float32`` dtype policy, so they stay float32 under a global ``mixed_float16`` policy (inputs are
autocast to float32 as well). :class:`Upsample2x`, :class:`GaussianBlur3D` and :class:`Subsample`
follow the global policy (they are used inside the decoders and the fusion block).
"""
from __future__ import annotations

from spirs_tf import transforms
from spirs_tf._compat import BACKEND, keras, ops, tf

__all__ = [
    "AffineMatrix",
    "ClipValues",
    "ComposeAffines",
    "ComposeDVF",
    "GaussianBlur3D",
    "OpeningConv3D",
    "PriorGate",
    "ScaleTranslation",
    "SpatialTransformer",
    "Subsample",
    "Upsample2x",
    "UpsampleDVF",
]

_register = keras.saving.register_keras_serializable(package="spirs_tf")


class _Float32Layer(keras.layers.Layer):
    """Base for layers that must compute in float32 regardless of the global policy."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)


def _spatial_times(shape, factor):
    return tuple(None if n is None else n * factor for n in shape)


@_register
class SpatialTransformer(_Float32Layer):
    """Warp a moving volume with an affine and/or a displacement field (:func:`transforms.warp`).

    Inputs, in this order: ``moving (B, D, H, W, C)``, then ``matrix (B, 3, 4)`` if
    ``use_affine``, then ``dvf (B, D, H, W, 3)`` if ``use_dvf``. Output ``(B, D, H, W, C)`` float32,
    ``moving(M(x − c) + t + u(x) + c)``, trilinear, zeros outside.

    Args:
        use_affine: expect a ``(B, 3, 4)`` matrix input.
        use_dvf: expect a ``(B, D, H, W, 3)`` displacement input.
    Raises:
        ValueError: if neither is used, or on the wrong number of inputs.
    """

    def __init__(self, use_affine: bool = True, use_dvf: bool = False, **kwargs):
        super().__init__(**kwargs)
        if not (use_affine or use_dvf):
            raise ValueError("SpatialTransformer needs use_affine=True and/or use_dvf=True")
        self.use_affine = bool(use_affine)
        self.use_dvf = bool(use_dvf)

    def _split(self, inputs):
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        expected = 1 + self.use_affine + self.use_dvf
        if len(inputs) != expected:
            names = ["moving"] + ["matrix"] * self.use_affine + ["dvf"] * self.use_dvf
            raise ValueError(f"SpatialTransformer expects inputs {names}, got {len(inputs)} tensors")
        moving = inputs[0]
        matrix = inputs[1] if self.use_affine else None
        dvf = inputs[-1] if self.use_dvf else None
        return moving, matrix, dvf

    def call(self, inputs):
        return transforms.warp(*self._split(inputs))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "use_affine": self.use_affine, "use_dvf": self.use_dvf}


@_register
class AffineMatrix(_Float32Layer):
    """15 affine parameters ``(B, 15)`` → ``[M | t]`` ``(B, 3, 4)``.

    See :func:`transforms.affine_params_to_matrix`.
    """

    def call(self, params):
        return transforms.affine_params_to_matrix(params)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 3, 4)


@_register
class ScaleTranslation(_Float32Layer):
    """``[M | t] → [M | factor·t]`` (:func:`transforms.scale_translation`); ``(B, 3, 4) → (B, 3, 4)``."""

    def __init__(self, factor: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = float(factor)

    def call(self, matrix):
        return transforms.scale_translation(matrix, self.factor)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


@_register
class ClipValues(_Float32Layer):
    """``x → clip(x, −limit, limit)`` elementwise (float32), e.g. P1's logits before P2 adds to them."""

    def __init__(self, limit: float = 4.0, **kwargs):
        super().__init__(**kwargs)
        self.limit = float(limit)

    def call(self, x):
        return ops.clip(ops.cast(x, "float32"), -self.limit, self.limit)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "limit": self.limit}


@_register
class PriorGate(_Float32Layer):
    """Inputs ``[residual, prior_mask]``, ``(B, D, H, W, 1)`` each → ``min(r, 0) + near · max(r, 0)``, with
    ``near`` 1 where the prior mask is positive anywhere in the ``size``³ window around the voxel, else 0
    (a soft prior's faint blob opens the gate as a whole lesion does): P2's residual may add a lesion only
    within ``size // 2`` voxels of the prior, and remove one anywhere."""

    def __init__(self, size: int = 7, **kwargs):
        super().__init__(**kwargs)
        self.size = int(size)

    def call(self, inputs):
        residual, prior = (ops.cast(x, "float32") for x in inputs)
        near = ops.cast(ops.max_pool(prior, pool_size=self.size, strides=1, padding="same") > 0.0, "float32")
        return ops.minimum(residual, 0.0) + near * ops.relu(residual)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "size": self.size}


@_register
class ComposeAffines(_Float32Layer):
    """Inputs ``[coarse, residual]``, ``(B, 3, 4)`` each → ``coarse · residual``.

    See :func:`transforms.compose_affines`.
    """

    def call(self, inputs):
        coarse, residual = inputs
        return transforms.compose_affines(coarse, residual)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])


@_register
class UpsampleDVF(_Float32Layer):
    """``u → 2·upsample2x(u)`` (:func:`transforms.upsample_dvf`); ``(B, D, H, W, 3) → (B, 2D, 2H, 2W, 3)``."""

    def call(self, dvf):
        return transforms.upsample_dvf(dvf)

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + _spatial_times(input_shape[1:4], 2) + (input_shape[4],)


@_register
class ComposeDVF(_Float32Layer):
    """Inputs ``[u_up, r]`` → ``u_up + r(x + u_up(x))`` (:func:`transforms.compose_dvf`)."""

    def call(self, inputs):
        u_up, residual = inputs
        return transforms.compose_dvf(u_up, residual)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])


@_register
class Upsample2x(keras.layers.Layer):
    """The authors' fixed ×2 upsampling (:func:`transforms.upsample2x`); no weights."""

    def call(self, x):
        return transforms.upsample2x(x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + _spatial_times(input_shape[1:4], 2) + (input_shape[4],)


@_register
class GaussianBlur3D(keras.layers.Layer):
    """Fixed per-channel Gaussian blur, 'same' zero padding (:func:`transforms.gaussian_blur`); no weights.

    Args:
        size: odd kernel size (authors: 5).
        sigma: standard deviation in voxels (authors: 1.0).
    Raises:
        ValueError: for an even/non-positive size or non-positive sigma.
    """

    def __init__(self, size: int = 5, sigma: float = 1.0, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        transforms.gaussian_kernel3d(size, sigma)  # validates
        self.size = int(size)
        self.sigma = float(sigma)

    def call(self, x):
        return transforms.gaussian_blur(x, self.size, self.sigma)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "size": self.size, "sigma": self.sigma}


@_register
class Subsample(keras.layers.Layer):
    """Strided subsample ``x[:, ::f, ::f, ::f]`` (:func:`transforms.subsample`)."""

    def __init__(self, factor: int = 2, **kwargs):
        super().__init__(**kwargs)
        if int(factor) != factor or factor < 1:
            raise ValueError(f"Subsample factor must be a positive integer, got {factor}")
        self.factor = int(factor)

    def call(self, x):
        return transforms.subsample(x, self.factor)

    def compute_output_shape(self, input_shape):
        def down(n):
            return None if n is None else -(-n // self.factor)

        return (input_shape[0],) + tuple(down(n) for n in input_shape[1:4]) + (input_shape[4],)

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def _shift_stacked(x, kernel, axis: int, padding: str):
    """``conv(x, kernel)`` computed as a convolution of ``K`` shifted copies of ``x`` stacked into channels.

    For ``kernel`` ``(K_d, K_h, K_w, C, F)`` and spatial ``axis`` (0 = D, 1 = H, 2 = W) of size ``K``:
    ``x_s[..., c·C + i] = x_pad[..., n + c (along axis), i]`` for ``c = 0..K−1`` (``x_pad`` padded along
    ``axis`` as the convolution's ``padding`` does), and the kernel moves its ``axis`` next to the
    input channels, ``k_s[.., 1 (axis), .., c·C + i, f] = kernel[.., c (axis), .., i, f]``. Then
    ``y = conv(x_s, k_s)`` with a kernel of size 1 along ``axis``:
    ``y[n] = Σ_c Σ_i Σ_(other taps) x_pad[n + c] · kernel[c]``, the same sum as ``conv(x, kernel)``,
    added in another order (equal to float rounding). ``padding`` is ``"same"`` (TensorFlow's
    convention: ``(K − 1) // 2`` before, the rest after) or ``"valid"``.
    """
    k = int(kernel.shape[axis])
    c_in, filters = int(kernel.shape[3]), int(kernel.shape[4])
    spatial_axis = axis + 1  # in (B, D, H, W, C)
    if padding == "same":
        before = (k - 1) // 2
        pads = [[0, 0]] * 5
        pads[spatial_axis] = [before, k - 1 - before]
        x = ops.pad(x, pads)
    stacked = _stack_shifts(x, k, spatial_axis)
    order = [a for a in range(3) if a != axis] + [axis, 3, 4]  # (other, other, axis, C, F)
    k_s = ops.reshape(ops.transpose(kernel, order), [int(kernel.shape[a]) for a in order[:2]] + [k * c_in, filters])
    k_s = ops.expand_dims(k_s, axis)  # size 1 along ``axis``
    return ops.conv(stacked, k_s, strides=1, padding=padding, data_format="channels_last")


def _fast_conv(x, kernel, axis: int, padding: str):
    """TensorFlow ``conv3d(x, kernel)`` whose input gradient is that of :func:`_shift_stacked`.

    Forward and kernel gradient are TensorFlow's own (as fast as any formulation measured on a CPU;
    the stacked kernel gradient is ~6× slower at 2 → 32 channels); the input gradient, slow in
    TensorFlow for few input channels, is the stacked convolution's (~3× faster at 2 → 8 and
    2 → 32 channels). All three are the plain convolution's values to float rounding.
    """
    def plain(a, k):
        return tf.nn.conv3d(a, k, [1] * 5, padding.upper())

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(upstream):
            # only the adjoints are evaluated: the forward ops under these tapes are never fetched
            with tf.GradientTape() as tape:
                tape.watch(x)
                stacked = _shift_stacked(x, kernel, axis, padding)
            dx = tape.gradient(stacked, x, output_gradients=upstream)
            with tf.GradientTape() as tape:
                tape.watch(kernel)
                y = plain(x, kernel)
            return dx, tape.gradient(y, kernel, output_gradients=upstream)
        return plain(x, kernel), grad

    return conv(x, tf.convert_to_tensor(kernel))


def _stack_shifts(x, k: int, axis: int):
    """``concat([x[.., c : c + n, ..] for c in 0..k−1], channels)`` along ``axis``, ``n = size − k + 1``.

    The copies are ``ops.slice`` (TensorFlow ``Slice``, whose gradient is a ``Pad``), not Python
    slicing (``StridedSlice``, whose gradient ``StridedSliceGrad`` is slow on a CPU: about a fifth of
    a stage-3 step when the opening convolutions used it).
    """
    shape = [int(d) if d is not None else -1 for d in x.shape]
    n = shape[axis] - k + 1
    sizes = list(shape)
    sizes[axis] = n
    starts = [[c if a == axis else 0 for a in range(5)] for c in range(k)]
    return ops.concatenate([ops.slice(x, start, sizes) for start in starts], axis=-1)


@_register
class OpeningConv3D(keras.layers.Conv3D):
    """``keras.layers.Conv3D`` for large kernels on few input channels, computed fast on a CPU.

    The same layer as ``Conv3D`` (same ``kernel`` variable ``(K_d, K_h, K_w, C_in, F)``, same config,
    same result to float rounding), whose convolution is evaluated on TensorFlow CPUs as a convolution
    of ``K`` shifted copies of the input stacked into channels where that wins (:func:`_fast_conv`):
    TensorFlow's CPU kernels serve the input gradient of a ``7³`` convolution with 2 input channels
    poorly, that of a ``1×7×7`` one with 14 stacked input channels well. Forward and kernel gradient
    stay TensorFlow's. Measured on a loaded 2-core machine, forward and both gradients: 7³, 2 → 8
    channels, 64³, batch 2: 0.41 s instead of 0.87 s; 2 → 32 channels, 128³: 3.0 s instead of 9.2 s. Elsewhere (another backend, a visible GPU, strides,
    dilation, groups, ``channels_first``, a kernel of size 1 along the stacking axis) it is plain
    ``Conv3D``.

    Class attribute ``stack_axis`` (0, 1, 2 = D, H, W; ``None`` = never) picks the shifted axis.
    """

    stack_axis = 0

    def _fast(self) -> bool:
        axis = type(self).stack_axis
        if BACKEND != "tensorflow" or axis is None or self.data_format != "channels_last":
            return False
        if self.groups != 1 or any(s != 1 for s in self.strides) or any(d != 1 for d in self.dilation_rate):
            return False
        if self.padding not in ("same", "valid") or self.kernel_size[axis] < 2:
            return False
        return not tf.config.list_logical_devices("GPU")

    def convolution_op(self, inputs, kernel):
        axis = type(self).stack_axis
        if self._fast() and inputs.shape[1 + axis] is not None:
            return _fast_conv(inputs, kernel, axis, self.padding)
        return super().convolution_op(inputs, kernel)
