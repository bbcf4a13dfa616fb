"""Errors users see. Each message names the file, line or config key at fault and what to do."""


class SerlensError(Exception):
    """Base class of the errors serlens raises on bad input."""


class CorpusError(SerlensError):
    """A corpus file is missing, unreadable or malformed."""


class ConfigError(SerlensError):
    """A config value is wrong."""


class WeightsError(SerlensError):
    """Model weights cannot be found or converted."""
