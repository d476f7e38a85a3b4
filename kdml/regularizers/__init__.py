"""kdml regularizers (registered serializable under the package "kdml")."""

from kdml.regularizers.soft_orthogonal import SoftOrthogonal

__all__ = ["SoftOrthogonal"]
