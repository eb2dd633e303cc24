"""CPU training kernels for the trainable top: same numbers as Keras's, faster on small maps.

- ``PatchConv2D``: a 3x3 'same' ReLU convolution as two matrix products, for maps
  of up to 6x6 (the top after block4_pool); it holds the same weights as Conv2D,
  so the stored model keeps plain Conv2D layers.
- ``fused_rmsprop``: Keras's RMSprop with TensorFlow's fused update kernel.
"""

from __future__ import annotations

PATCH_MAX_POSITIONS = 36  # up to 6x6 maps: the neighbour gather stays a small fraction


def neighbour_matrix(h: int, w: int):
    """0/1 matrix (h*w*9, h*w): row (position, tap) picks the input position that a
    3x3 'same' convolution reads there, or nothing where the tap falls in the padding."""
    import numpy as np

    s = np.zeros((h * w * 9, h * w), np.float32)
    for oy in range(h):
        for ox in range(w):
            for tap in range(9):
                y, x = oy + tap // 3 - 1, ox + tap % 3 - 1
                if 0 <= y < h and 0 <= x < w:
                    s[(oy * w + ox) * 9 + tap, y * w + x] = 1.0
    return s


def patch_conv_class():
    """A 3x3, stride-1, same-padding ReLU convolution computed as matrix products.

    On the small maps of the trainable top (3x3 after block4_pool at 48x48) the
    convolution kernels run far below the CPU's matrix units. Here one small
    matrix product with a constant 0/1 matrix gathers each position's nine
    neighbours (its gradient is the transposed product: no slicing kernels, which
    are slow in bfloat16 on CPU), and one GEMM applies the kernel. Same numbers
    as Conv2D; it holds the same weights (kernel (3, 3, in, out), bias), so the
    stored model uses plain Conv2D layers and needs none of this.
    """
    import keras
    from keras import ops

    class PatchConv2D(keras.layers.Layer):
        def __init__(self, filters: int, **kwargs):
            super().__init__(**kwargs)
            self.filters = filters

        def build(self, input_shape):
            _, h, w, c = input_shape
            self.kernel = self.add_weight(
                shape=(3, 3, c, self.filters), initializer="glorot_uniform", name="kernel"
            )
            self.bias = self.add_weight(shape=(self.filters,), initializer="zeros", name="bias")
            self.neighbours = neighbour_matrix(h, w)

        def call(self, x):
            _, h, w, c = x.shape
            pick = ops.convert_to_tensor(self.neighbours, dtype=x.dtype)
            patches = ops.matmul(pick, ops.reshape(x, (-1, h * w, c)))  # (b, h*w*9, c)
            kernel = ops.cast(ops.reshape(self.kernel, (9 * c, self.filters)), x.dtype)
            y = ops.matmul(ops.reshape(patches, (-1, 9 * c)), kernel)
            y = ops.reshape(y, (-1, h, w, self.filters)) + ops.cast(self.bias, x.dtype)
            return ops.relu(y)

    return PatchConv2D


def as_patch_conv(layer):
    """The fast training twin of a VGG16 conv layer on a small map (same name, same
    weights), or the layer itself."""
    cfg = layer.get_config()
    _, h, w, _ = layer.input.shape
    if not (
        cfg.get("kernel_size") == (3, 3)
        and cfg.get("strides") == (1, 1)
        and cfg.get("padding") == "same"
        and cfg.get("activation") == "relu"
        and h * w <= PATCH_MAX_POSITIONS
    ):
        return layer
    twin = patch_conv_class()(cfg["filters"], name=layer.name)
    twin.build(layer.input.shape)
    twin.set_weights(layer.get_weights())
    return twin


def fused_rmsprop(learning_rate):
    """Keras's RMSprop (rho 0.9, eps 1e-7, no momentum) with each variable's update
    done by TensorFlow's fused ``ResourceApplyRMSProp`` kernel: one pass over the
    weights instead of Keras's chain of element-wise ops (measured 6.6 against
    14.8 ms a step for VGG16's block5 + head on this CPU). Same formula: ``ms =
    rho*ms + (1-rho)*g^2``, ``w -= lr*g/sqrt(ms + eps)``; the kernel keeps the
    last increment in a slot of its own. On other Keras backends: plain RMSprop."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return keras.optimizers.RMSprop(learning_rate=learning_rate)
    import tensorflow as tf

    class FusedRMSprop(keras.optimizers.RMSprop):
        def build(self, var_list):
            if self.built:
                return
            super().build(var_list)
            self._increments = self.add_optimizer_variables(var_list, "increment")

        def update_step(self, gradient, variable, learning_rate):
            i = self._get_variable_index(variable)
            tf.raw_ops.ResourceApplyRMSProp(
                var=variable.handle,
                ms=self._velocities[i].value.handle,
                mom=self._increments[i].value.handle,
                lr=tf.cast(learning_rate, variable.dtype),
                rho=tf.cast(self.rho, variable.dtype),
                momentum=tf.zeros((), variable.dtype),
                epsilon=tf.cast(self.epsilon, variable.dtype),
                grad=tf.cast(gradient, variable.dtype),
            )

    return FusedRMSprop(learning_rate=learning_rate)
