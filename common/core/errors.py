"""The errors a user can fix (a stale or damaged file, a bad budget, a busy folder): scripts end them in
one line (``cli.clear_errors``) instead of a traceback. Each layer defines its own subclasses; this base
lets the CLI catch them without importing the layers above it."""


class UserError(Exception):
    """An error whose message says what is wrong and what to do; printed as one line, exit status 1."""


class StaleArtifactError(UserError, RuntimeError):
    """A file was made from other inputs than the ones asked for now (config, checkpoint, settings)."""


class UnavailableDeviceError(UserError, RuntimeError):
    """The configured device is not on this machine."""
