"""Which hypervisor implementation serves a replica (the lab, or the vCenter it was found on)."""

from django.conf import settings


def lab():
    from .lab import LabHypervisor

    return LabHypervisor(settings.LAB_ROOT)


def for_connection(connection):
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
        timeout=settings.FAILBACK_VSPHERE_TIMEOUT,
        retries=settings.FAILBACK_VSPHERE_RETRIES,
    )


def hypervisor_for(replica):
    if replica.platform == "lab":
        return lab()
    if replica.platform == "vsphere" and replica.connection_id:
        return for_connection(replica.connection)
    raise LookupError(f"No hypervisor for replica {replica.name} (platform {replica.platform!r})")
