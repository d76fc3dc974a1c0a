"""Errors users are expected to catch.

A ``KvcompileError`` is a user mistake or an environment limit (bad map, unsupported model,
context too long): the CLI prints its message as one line and exits with status 2.  Any other
exception is a bug and keeps its traceback.
"""


class KvcompileError(Exception):
    """A problem the user can fix; its message is one line naming what was expected."""


class ArtifactError(KvcompileError):
    """A saved artifact (precision map, calibration, ...) is malformed or of another version."""


class SchemeError(KvcompileError):
    """Unknown storage scheme, or input a scheme cannot store (NaN, inf, out of range)."""


class ModelError(KvcompileError):
    """Model file missing, unreadable, or of an architecture without an adapter."""


class CacheError(KvcompileError):
    """Misuse of the mixed-precision cache (context too long, shape mismatch, non-finite values)."""


class DataError(KvcompileError):
    """Calibration / evaluation text missing or failing its checksum."""


class ExportError(KvcompileError):
    """A map or model the exporter cannot emit, or an export directory that is not one."""


class RuntimeBackendError(KvcompileError):
    """A backend (ONNX Runtime, TensorRT) missing, unable to run here, or given bad inputs."""
