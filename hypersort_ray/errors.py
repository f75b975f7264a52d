"""Exceptions that carry a user-facing message naming the file/field and what is wrong.

The CLI prints ``error: <message>`` for these and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class HypersortError(ValueError):
    """Base class: the message is complete and meant for the user."""


class ConfigError(HypersortError):
    """A configuration value that cannot be used (message names the key path and value)."""


class DataError(HypersortError):
    """A datalist, image or label that cannot be used (message names the case and file)."""


class ModelError(HypersortError):
    """A model reference, checkpoint, style or latent that cannot be used."""


class RunError(HypersortError):
    """A run folder that lacks what a command needs."""


class RunExistsError(RunError):
    """A command would write a new run into a folder that already holds one."""


class ProvenanceError(RunError):
    """A derived artefact (styles, analysis, model folder) was made from another checkpoint."""
