"""KV storage formats: specs, torch reference quantize/dequantize, bit packing, exact sizes.

``get_scheme("int4")`` returns a :class:`StorageScheme`; ``scheme_names()`` lists the registered
families' canonical names.  Importing this package registers the built-in families.
"""

from kvcompile.quant.base import QuantizedTensor, StorageScheme, get_scheme, register_family, scheme_names
from kvcompile.quant import floating, integer, lloyd, nf4, outliers, prerope, sketch  # noqa: F401  (register the families)

__all__ = ["QuantizedTensor", "StorageScheme", "get_scheme", "register_family", "scheme_names"]
