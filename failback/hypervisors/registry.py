"""Which hypervisor implementation serves a replica: a table from its platform to a factory.

``Platform`` is the list of platforms a replica can be on (``Replica.platform``'s choices). It lives
here, beside the table, so that adding a platform is one entry in each, side by side (plus a
migration for the new choice); see docs/platforms.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import models

from .base import Hypervisor


class Platform(models.TextChoices):
    LAB = "lab", "Lab"
    VSPHERE = "vsphere", "vSphere"


def lab() -> Hypervisor:
    from .lab import LabHypervisor

    return LabHypervisor(settings.LAB_ROOT, transport=settings.LAB_TRANSPORT)


def for_connection(connection: Any) -> Hypervisor:
    from .vsphere import VSphereHypervisor

    return VSphereHypervisor(
        connection.host,
        port=connection.port,
        user=connection.username,
        password=connection.reveal_password(),
        thumbprint=connection.thumbprint if connection.tls_mode == connection.TLS.THUMBPRINT else None,
        verify=True,
        datastore_paths=connection.datastore_paths or None,
        transport=connection.transport,
        vddk_libdir=settings.FAILBACK_VDDK_LIBDIR or None,
        timeout=settings.FAILBACK_VSPHERE_TIMEOUT,
        retries=settings.FAILBACK_VSPHERE_RETRIES,
    )


def _vsphere_for(replica: Any) -> Hypervisor:
    if not replica.connection_id:
        raise LookupError(f"No hypervisor for replica {replica.name}: it is on vSphere but has no vCenter connection.")
    return for_connection(replica.connection)


# platform -> factory(replica): the adapter that serves a replica on that platform
FACTORIES: dict[str, Callable[[Any], Hypervisor]] = {
    Platform.LAB: lambda replica: lab(),
    Platform.VSPHERE: _vsphere_for,
}


def hypervisor_for(replica: Any) -> Hypervisor:
    """The adapter for the replica's platform; LookupError for a platform without one."""
    factory = FACTORIES.get(replica.platform)
    if factory is None:
        known = ", ".join(sorted(FACTORIES))
        raise LookupError(
            f"No hypervisor for replica {replica.name}: unknown platform {replica.platform!r} (known: {known})."
        )
    return factory(replica)
