"""Reference-faithful primitives: convolution, batch norm, classifier, zero-pad shortcut.

The DHM reference is PyTorch. Keras defaults differ from it in ways that change the
numbers a model produces or the way it trains:

* BatchNorm: PyTorch eps 1e-5, momentum 0.1 (== Keras momentum 0.9); Keras defaults to
  eps 1e-3, momentum 0.99.
* Conv init: the reference draws conv kernels from N(0, 2 / (k*k*out_channels)) (He normal
  over fan-out, untruncated); Keras defaults to Glorot uniform.
* Dense init: PyTorch's Linear default is U(+-1/sqrt(fan_in)) for kernel AND bias; Keras
  defaults to Glorot uniform kernel and zero bias.
* Padding: PyTorch pads every side by k//2. Keras "same" with stride 2 on an even input
  pads only bottom/right, which shifts the sampling grid by one pixel, so ported weights
  would give different outputs. We pad explicitly and use a "valid" convolution.
* Max pooling: PyTorch's padded MaxPool2d pads with -inf on every side;
  `PaddedMaxPooling2D` does the same (zero padding could win for negative inputs).
* Depthwise conv: PyTorch's fan-out of a depthwise kernel (c, 1, k, k) is k*k*c; Keras'
  is k*k, so the init std is set explicitly.

Every helper here builds a *fresh* initializer per layer: an unseeded Keras 3 initializer
instance draws its seed once, so sharing one instance would give identical kernels to
every layer of the same shape.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import keras
from keras import ops

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

# Whether `batch_norm` builds synchronised (cross-replica) layers; set with
# `synchronized_batch_norm()` around a model build. Off by default.
_SYNC_BN = contextvars.ContextVar("dhm_sync_batch_norm", default=False)


@contextlib.contextmanager
def synchronized_batch_norm(enabled: bool = True):
    """Every `batch_norm` built inside uses the GLOBAL batch's statistics.

    With N replicas each replica normally normalises with the mean/variance of
    its own global/N examples; synchronised BN all-reduces them (two extra
    all-reduces per BN layer per step), so training matches one replica with
    the global batch. Useful when the per-replica batch is small (ImageNet
    on many GPUs). Off by default, as in the reference's single-GPU CIFAR runs.
    """
    token = _SYNC_BN.set(bool(enabled))
    try:
        yield
    finally:
        _SYNC_BN.reset(token)


def conv_kernel_initializer() -> keras.initializers.Initializer:
    """He normal over fan-out, untruncated: the reference's `normal_(0, sqrt(2/n))`."""
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal"
    )


def dense_initializers(fan_in: int):
    """(kernel, bias) initializers equal to PyTorch's nn.Linear default.

    Kernel: VarianceScaling(1/3, fan_in, uniform) has limit sqrt(3 * (1/3) / fan_in) =
    1/sqrt(fan_in). The bias needs the *kernel's* fan-in, which a bias initializer cannot
    see (it only gets the bias shape), so it is a RandomUniform with an explicit bound.
    """
    bound = 1.0 / math.sqrt(fan_in)
    kernel = keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
    )
    bias = keras.initializers.RandomUniform(minval=-bound, maxval=bound)
    return kernel, bias


def _torch_padding(x, kernel_size: int, strides: int, *, name: str):
    """(input, Keras padding) giving PyTorch's pad of kernel_size // 2 on every side.

    Stride 1 with an odd kernel: Keras "same" already pads symmetrically, so it is kept
    (one layer fewer). Otherwise an explicit ZeroPadding2D named `<name>_pad` precedes a
    "valid" convolution.
    """
    pad = kernel_size // 2
    if pad == 0:
        return x, "valid"
    if strides == 1 and kernel_size % 2 == 1:
        return x, "same"
    return keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x), "valid"


def conv2d(x, filters: int, kernel_size: int, strides: int = 1, *, name: str):
    """Bias-free convolution padded by kernel_size // 2 on every side (PyTorch semantics).

    Stride 1 with an odd kernel: Keras "same" pads (k-1)/2 on both sides, exactly like
    PyTorch, so it is kept (one layer fewer). Otherwise an explicit ZeroPadding2D named
    `<name>_pad` precedes a "valid" convolution.
    """
    x, padding = _torch_padding(x, kernel_size, strides, name=name)
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=False,
        kernel_initializer=conv_kernel_initializer(),
        name=name,
    )(x)


def depthwise_conv2d(x, kernel_size: int, strides: int = 1, *, name: str):
    """Bias-free depthwise convolution (channel multiplier 1), PyTorch padding and init.

    PyTorch's depthwise conv is `Conv2d(c, c, k, groups=c)` with weight (c, 1, k, k); the
    reference init `normal_(0, sqrt(2 / (k*k*out_channels)))` therefore has std
    sqrt(2 / (k*k*c)). Keras' fan-out of a (k, k, c, 1) depthwise kernel is k*k (the
    multiplier), which would give a std sqrt(c) times larger, so the std is set here.
    """
    channels = int(x.shape[-1])
    x, padding = _torch_padding(x, kernel_size, strides, name=name)
    return keras.layers.DepthwiseConv2D(
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=False,
        depthwise_initializer=keras.initializers.RandomNormal(
            stddev=math.sqrt(2.0 / (kernel_size * kernel_size * channels))
        ),
        name=name,
    )(x)


def max_pool2d(x, pool_size: int, strides: int, padding: int, *, name: str):
    """PyTorch `MaxPool2d(pool_size, strides, padding)`: symmetric padding that never wins.

    Keras "same" pads bottom/right only (another sampling grid); zero padding would be a
    candidate maximum for negative inputs. `PaddedMaxPooling2D` pads with -inf instead.
    """
    return PaddedMaxPooling2D(pool_size, strides, padding, name=name)(x)


def dropout(x, rate: float, *, name: str):
    """Dropout active only with training=True; no layer at all for rate 0."""
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name}: dropout rate must lie in [0, 1), got {rate}")
    if rate == 0.0:
        return x
    return keras.layers.Dropout(rate, name=name)(x)


def batch_norm(x, *, name: str, synchronized=None):
    """BatchNormalization with the reference's (PyTorch) epsilon and momentum.

    synchronized: cross-replica statistics; None follows the enclosing
    `synchronized_batch_norm()` context (default off).
    """
    if synchronized is None:
        synchronized = _SYNC_BN.get()
    return BatchNormalization(
        axis=-1,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        synchronized=bool(synchronized),
        name=name,
    )(x)


@keras.saving.register_keras_serializable(package="dhm_keras")
class BatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization whose moving statistics stay mirrored across replicas.

    Keras 3.15 creates `moving_mean` / `moving_variance` with aggregation "none":
    under MirroredStrategy each replica then assigns ITS OWN copy of the mirrored
    variable, the copies drift apart (measured: replica 0 kept the statistics of
    its half of the batch, replica 1 of the other half), checkpoints hold
    replica 0's only, and under MultiWorkerMirroredStrategy every worker ends
    with different statistics. With aggregation "mean" each update is averaged
    over replicas (workers included), as tf.keras' BatchNormalization did, so
    every copy holds the same value. One replica: no change at all.
    """

    def add_weight(self, *args, **kwargs):
        if kwargs.get("name") in ("moving_mean", "moving_variance"):
            kwargs["aggregation"] = "mean"
        return super().add_weight(*args, **kwargs)

    # Training steps normalise with TensorFlow's fused kernel (see `call`);
    # False restores Keras' own path everywhere (benchmarks compare the two).
    fused = True

    def _can_fuse(self, inputs, training, mask) -> bool:
        """Whether this training-mode call is one the fused kernel computes exactly.

        Plain per-replica NHWC statistics only: synchronised statistics, batch
        renormalisation and masks need Keras' own path, and so does inference
        (moving statistics: a multiply-add that graph optimisers fold anyway).
        """
        return (
            self.fused
            and training is True
            and self.trainable
            and mask is None
            and not self.synchronized
            and not self.renorm
            and keras.backend.backend() == "tensorflow"
            and len(inputs.shape) == 4
            and self.axis % 4 == 3  # channels last (-1 or 3)
            and keras.backend.standardize_dtype(inputs.dtype)
            in ("float32", "float16", "bfloat16")
        )

    def call(self, inputs, training=None, mask=None):
        """Keras' BatchNormalization, with one fused kernel for training steps.

        Why: Keras 3 normalises with separate ops (moments, then scale and
        shift; autodiff adds a backward op for each), several passes over every
        activation: about a third of a ResNet-32 DHM training step's op time
        on CPU (benchmarks/profile_step.py; about a fifth fused).
        `FusedBatchNormV3` (oneDNN's kernel on CPU, cuDNN's on GPU) does each
        direction in one op. Same results:
        batch mean and BIASED batch variance for the output and for the moving
        statistics (the kernel reports the unbiased variance; it is rescaled),
        float32 statistics for float16/bfloat16 inputs.
        """
        if not self._can_fuse(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf  # the fused kernel exists on this backend only

        channels = inputs.shape[-1]
        scale = ops.cast(self.gamma, "float32") if self.scale else ops.ones((channels,))
        offset = ops.cast(self.beta, "float32") if self.center else ops.zeros((channels,))
        empty = tf.constant([], tf.float32)
        outputs, mean, unbiased_variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=scale,
            offset=offset,
            mean=empty,
            variance=empty,
            epsilon=self.epsilon,
            exponential_avg_factor=1.0,
            data_format="NHWC",
            is_training=True,
        )
        count = tf.cast(tf.size(inputs, out_type=tf.int64) // channels, tf.float32)
        variance = unbiased_variance * ((count - 1.0) / tf.maximum(count, 1.0))
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(
            self.moving_variance * momentum + variance * (1.0 - momentum)
        )
        return ops.cast(outputs, self.compute_dtype)


def relu(x, *, name: str):
    return keras.layers.ReLU(name=name)(x)


def classifier(x, num_classes: int, *, name: str):
    """Final Dense of a head: logits (no softmax), always float32.

    dtype="float32" keeps the logits (and the softmax/KL computed from them) in float32
    under a mixed-precision policy; Keras casts the bfloat16/float16 input up.
    """
    kernel_init, bias_init = dense_initializers(int(x.shape[-1]))
    return keras.layers.Dense(
        num_classes,
        kernel_initializer=kernel_init,
        bias_initializer=bias_init,
        dtype="float32",
        name=name,
    )(x)


@keras.saving.register_keras_serializable(package="dhm_keras")
class ChannelZeroPad(keras.layers.Layer):
    """Appends `extra_channels` all-zero channels after the input's channels (NHWC).

    This is the parameter-free half of the reference CIFAR ResNet shortcut
    (`torch.cat([avgpool(x), zeros], dim=1)`). A named, registered layer rather than a
    Lambda so that models serialize to `.keras` and reload without custom code.
    """

    def __init__(self, extra_channels: int, **kwargs):
        super().__init__(**kwargs)
        if int(extra_channels) < 0:
            raise ValueError(f"extra_channels must be >= 0, got {extra_channels}")
        self.extra_channels = int(extra_channels)

    def call(self, inputs):
        rank = len(inputs.shape)
        paddings = [[0, 0]] * (rank - 1) + [[0, self.extra_channels]]
        return ops.pad(inputs, paddings)

    def compute_output_shape(self, input_shape):
        channels = input_shape[-1]
        out = None if channels is None else channels + self.extra_channels
        return (*input_shape[:-1], out)

    def get_config(self):
        config = super().get_config()
        config["extra_channels"] = self.extra_channels
        return config


@keras.saving.register_keras_serializable(package="dhm_keras")
class PaddedMaxPooling2D(keras.layers.Layer):
    """Max pooling after `padding` rows/columns of -inf on EVERY side (NHWC).

    Equal to PyTorch's `nn.MaxPool2d(pool_size, strides, padding)`: the padding widens the
    sampling grid symmetrically but is never selected as a maximum (and receives no
    gradient), whatever the sign of the input.
    """

    def __init__(self, pool_size: int, strides: int, padding: int, **kwargs):
        super().__init__(**kwargs)
        self.pool_size = int(pool_size)
        self.strides = int(strides)
        self.padding = int(padding)
        if self.padding < 0 or 2 * self.padding > self.pool_size:
            raise ValueError(
                f"padding must lie in [0, pool_size / 2] (PyTorch's rule), got {padding}"
            )

    def call(self, inputs):
        p = self.padding
        if p:
            inputs = ops.pad(
                inputs, [[0, 0], [p, p], [p, p], [0, 0]], constant_values=float("-inf")
            )
        return ops.max_pool(inputs, self.pool_size, self.strides, padding="valid")

    def compute_output_shape(self, input_shape):
        def size(n):
            return None if n is None else (n + 2 * self.padding - self.pool_size) // self.strides + 1

        return (input_shape[0], size(input_shape[1]), size(input_shape[2]), input_shape[3])

    def get_config(self):
        config = super().get_config()
        config.update(pool_size=self.pool_size, strides=self.strides, padding=self.padding)
        return config
