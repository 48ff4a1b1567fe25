"""Bottom layer: the domain exceptions. The CLI turns each into a one-line message and its exit code."""
from __future__ import annotations


class NeardupError(Exception):
    """Base class of every error neardup reports to a user."""

    exit_code: int = 2


class InputError(NeardupError):
    """Bad user input: missing or empty folder, bad option value, output in a missing directory."""


class StoreError(NeardupError):
    """The store file is missing, unreadable, or not a neardup store."""

    #: set on damage only (`neardup.store.damage.damaged`; absent otherwise: read them with getattr): what was
    #: found, without advice, and the damaged segment's name ("" for the manifest)
    reason: str
    segment: str


class StoreMismatchError(StoreError):
    """The store was made with another model, weights or dimension than the one asked for."""


class StoreLockedError(NeardupError):
    """Another process is writing the store."""


class WeightsError(NeardupError):
    """Model weights could not be found or loaded."""


class DecodeError(NeardupError):
    """One image could not be read or decoded. Pipelines record these as (path, reason) rows."""


class ServerError(NeardupError):
    """A query server (`neardup serve`) could not be reached or refused a request."""


class WorkerError(NeardupError):
    """A worker process or cluster node died, and the work it held could not be redone."""
