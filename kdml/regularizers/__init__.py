"""kdml regularizers (registered serializable under the package "kdml").

A regularizer is passed where Keras takes one, e.g. on the proxies; its penalty joins
`layer.losses` and `model.losses`. Orthonormal proxies have no soft-orthogonality
penalty:

>>> proxies = kdml.layers.Proxies(3, initializer="identity",
...                               proxy_regularizer=SoftOrthogonal(strength=1.0))
>>> _ = proxies(np.zeros((1, 8), "float32"))
>>> [round(float(penalty), 6) for penalty in proxies.losses]
[0.0]
"""

from kdml.regularizers.soft_orthogonal import SoftOrthogonal

__all__ = ["SoftOrthogonal"]
