"""One exception tree for the whole agent; each family carries the CLI exit code it maps to."""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3


class EdgeAgentError(Exception):
    """Base of every error the agent raises on purpose; its message is meant for a person."""

    exit_code = EXIT_UNEXPECTED


# --- usage and input: the person asked for something that cannot be done (exit 2) ---


class UsageError(EdgeAgentError):
    """A command line, file or value given by the user is wrong."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A configuration file is missing, unreadable or has a wrong key or value."""


class InputDataError(UsageError):
    """Input data (an .npy file, a golden set, a frame) does not fit what is expected."""


class ModelError(UsageError):
    """A model file is missing, truncated, not a model, or does not fit its data."""


class BackendUnavailableError(UsageError):
    """The requested inference backend or execution provider is not installed here."""


class GoldenSetError(InputDataError):
    """The golden set is malformed: shapes, dtypes, NaNs, labels, lengths."""


# --- refusals: a check ran and said no (exit 3) ---


class RefusedError(EdgeAgentError):
    """A safety check refused something: a signature, a package, a gate, a downgrade."""

    exit_code = EXIT_REFUSED


class PackageError(RefusedError):
    """A model package is malformed, unsafe or fails verification."""


class SignatureError(PackageError):
    """Signatures are missing, invalid, from untrusted keys or below the threshold."""


class IntegrityError(PackageError):
    """A file's hash or size does not match what the signed manifest declares."""


class UnsafePackageError(PackageError):
    """A package member tries to escape its directory or is not a regular file."""


class ManifestError(PackageError):
    """The manifest is not valid JSON or does not follow the manifest schema."""


class CompatibilityError(PackageError):
    """The package does not fit this agent version, hardware class or runtime."""


class DowngradeError(RefusedError):
    """A version or release counter is lower than the high-water mark kept on the device."""


class GateFailedError(RefusedError):
    """The golden-set gate refused a candidate model."""


# --- runtime faults (exit 1 unless a subclass says otherwise) ---


class RuntimeFaultError(EdgeAgentError):
    """Inference failed at run time (the backend raised while running a model)."""


class SourceError(EdgeAgentError):
    """An input source (camera, video, directory) cannot be opened or read."""


class TelemetryError(EdgeAgentError):
    """The telemetry store or uploader failed."""


class OTAError(EdgeAgentError):
    """The over-the-air update could not proceed (network, disk, journal)."""


class FetchError(OTAError):
    """A download failed: timeout, too slow, cut, wrong length or hash."""


class RepositoryError(RefusedError):
    """TUF repository metadata is invalid, expired, replayed or badly signed."""


class StateError(EdgeAgentError):
    """The on-device state does not allow it now: no previous model, a model on probation,
    a state dir locked by another process, a journal that cannot be read or written."""

    # not a bug (1) and not the user's input (2): the device's state refuses it, like a check
    exit_code = EXIT_REFUSED
