"""Every error zqhero_fx raises on bad input names the problem; they share one base class so callers can catch it."""


class ZqheroError(Exception):
    """Base class of every error zqhero_fx raises on purpose."""


class CaptureError(ZqheroError):
    """The model could not be captured as a graph (untraceable Python, data-dependent control flow, bad inputs)."""


class InputError(ZqheroError, TypeError):
    """A converted model was called with an input it cannot take, such as token ids that are not an integer tensor."""


class ConfigError(ZqheroError, ValueError):
    """An unknown mode, a bad override, or an option that makes no sense."""


class CalibrationError(ZqheroError):
    """Calibration data is missing or empty, or produced NaN/Inf activations."""


class FoldError(ZqheroError):
    """A scale fold changed what the float graph computes: a bug in a fold's legality check."""


class PassError(ZqheroError):
    """A pass failed; the message names the pass and the ones that ran before it."""


class CoverageError(ZqheroError):
    """convert(..., strict=True) found sites the mode should quantize left in floating point."""


class SerializationError(ZqheroError):
    """A converted model could not be saved or loaded."""
