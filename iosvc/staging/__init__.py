"""Cross-cluster datasets: sites, a catalog of datasets and replicas, and staging.

``iosvc datasets register/ls/show`` and ``iosvc stage`` are the command-line side; this
package is the library: :class:`Stager` over a :class:`Catalog` and :class:`Sites`, with
transfer backends behind :class:`TransferBackend` (fsspec here, Globus in ``_globus``).
"""

from iosvc.staging._backend import (
    Endpoint,
    FileEntry,
    TaskStatus,
    TransferBackend,
    TransferRequest,
)
from iosvc.staging._catalog import Catalog, DatasetRecord, ReplicaRecord, TaskRecord
from iosvc.staging._fsspec_backend import CopyResult, FsspecBackend, copy_files
from iosvc.staging._manifest import VerifyReport, build_manifest, verify
from iosvc.staging._sites import Site, Sites, load_sites
from iosvc.staging._stage import Stager, StageResult, TransferFailed, TransferInProgress

__all__ = [
    "Catalog",
    "CopyResult",
    "DatasetRecord",
    "Endpoint",
    "FileEntry",
    "FsspecBackend",
    "ReplicaRecord",
    "Site",
    "Sites",
    "StageResult",
    "Stager",
    "TaskRecord",
    "TaskStatus",
    "TransferBackend",
    "TransferFailed",
    "TransferInProgress",
    "TransferRequest",
    "VerifyReport",
    "build_manifest",
    "copy_files",
    "load_sites",
    "verify",
]
