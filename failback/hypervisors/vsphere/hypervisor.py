"""``VSphereHypervisor``: the session, inventory, provisioning, lifecycle, datastore and change-tracking
parts composed into one adapter behind the ``Hypervisor`` Protocol."""

from __future__ import annotations

import threading
from typing import Any

from ..base import HypervisorError
from .client import Client
from .datastore import DatastoreFiles
from .inventory import InventoryReader
from .lifecycle import Lifecycle
from .provisioning import Provisioning
from .tls import _normalise_thumbprint, _tls_context
from .tracking import ChangeTracking


class VSphereHypervisor(Client, InventoryReader, Provisioning, Lifecycle, DatastoreFiles, ChangeTracking):
    """vCenter (or vcsim) behind the Hypervisor Protocol; see the package docstring."""

    name = "vsphere"

    def __init__(
        self,
        host: str,
        *,
        port: int = 443,
        user: str,
        password: str,
        thumbprint: str | None = None,
        verify: bool = True,
        datastore_paths: dict[str, str] | None = None,
        transport: str = "direct",
        vddk_libdir: str | None = None,
        timeout: float = 30,
        retries: int = 3,
        task_timeout: float = 900,
    ) -> None:
        if transport not in ("direct", "network", "nbd"):
            raise HypervisorError(f"Unknown transport {transport!r}: 'direct', 'network' or 'nbd'.")
        if timeout <= 0 or retries < 0:
            raise HypervisorError("timeout must be positive and retries not negative.")
        self.host, self.port, self.user = host, int(port), user
        self._password = password
        self.thumbprint = _normalise_thumbprint(thumbprint) if thumbprint else None
        self._ctx = _tls_context(self.thumbprint, verify)
        self.transport = transport
        self.vddk_libdir = vddk_libdir or None
        self.timeout, self.retries, self.task_timeout = float(timeout), int(retries), float(task_timeout)
        self._datastore_paths = dict(datastore_paths or {})
        self._lock = threading.RLock()
        self._si: Any = None
        self._content: Any = None
        self._stub: Any = None
        self._cbt_supported: bool | None = None
        self._cbt_refusal = ""
        self._dc_of_ds: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"VSphereHypervisor({self.host!r}, port={self.port}, user={self.user!r}, transport={self.transport!r})"

    def vm_meta(self, vm_id: str) -> dict[str, Any]:
        """No guest hints: vCenter does not know how long a guest takes to shut down (the prediction
        uses its default, then what it measured on the VM's last switch)."""
        return {}
