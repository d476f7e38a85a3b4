"""`PixelNormalization`: raw RGB pixels in [0, 255] -> the backbone's input scale."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kdml")
class PixelNormalization(keras.layers.Layer):
    """`(pixels - mean) / std` per channel, optionally reordering RGB to BGR.

    It lives inside the embedder so that a saved or exported model takes camera
    pixels as they are (uint8 or float, RGB, [0, 255]).

    Args:
        mean: 3 floats, per-channel mean on the [0, 255] scale (RGB order).
        std: 3 floats, per-channel standard deviation on the [0, 255] scale.
        channel_order: "rgb" or "bgr" (Caffe-style backbones such as ResNet50
            from `keras.applications` expect BGR).

    Shapes: `(B, H, W, 3) -> (B, H, W, 3)` in the layer's compute dtype.

    Example:

    >>> pixel = np.array([[[[0.0, 127.5, 255.0]]]])  # (1, 1, 1, 3): one RGB pixel
    >>> PixelNormalization()(pixel).numpy()  # (x - 127.5) / 127.5
    array([[[[-1.,  0.,  1.]]]], dtype=float32)
    >>> bgr = PixelNormalization(mean=(0, 0, 0), std=(1, 2, 4), channel_order="bgr")
    >>> bgr(pixel).numpy()  # (255 / 4, 127.5 / 2, 0 / 1): B, G, R
    array([[[[63.75, 63.75,  0.  ]]]], dtype=float32)
    """

    def __init__(self, mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5),
                 channel_order="rgb", **kwargs):
        super().__init__(**kwargs)
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(
                f"`channel_order` must be 'rgb' or 'bgr'. Received: channel_order={channel_order!r}"
            )
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(
                f"`mean` and `std` need 3 values each, std > 0. Received: mean={mean}, std={std}"
            )
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.channel_order = channel_order

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.channel_order == "bgr":
            x = ops.flip(x, axis=-1)
            mean, std = self.mean[::-1], self.std[::-1]
        else:
            mean, std = self.mean, self.std
        mean = ops.convert_to_tensor(mean, self.compute_dtype)
        scale = ops.convert_to_tensor([1.0 / s for s in std], self.compute_dtype)
        return (x - mean) * scale

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean": list(self.mean), "std": list(self.std),
                "channel_order": self.channel_order}
