"""The vSphere hypervisor: vCenter through pyvmomi, behind the same Protocol as the lab.

The adapter is composed of one part per concern, each in its own module:

- ``tls``: certificate checks on every connection (pinned SHA-256 thumbprint, or the system CA
  store); ``fetch_thumbprint`` for first contact.
- ``client``: the SOAP session (connect, log in, bounded retries, one re-login) and vSphere's fault
  messages (``fault_message``); waiting for tasks.
- ``inventory``: the property collector, ``inventory``, ``vm_config``, host and power states,
  custom attributes and the wizard's ``placement``.
- ``provisioning``: ``create_vm_like`` (the ConfigSpec of the production VM, with its owner tag).
- ``lifecycle``: power, guest shutdown, ownership look-ups and ``delete_vm``.
- ``datastore``: disk data, through a locally mounted datastore (``disk_path``, direct transport) or
  the datastore HTTP file interface (``download_range``, ``copy_disk_network``).
- ``tracking``: change tracking (``change_tracking``, ``changed_areas``).
- ``hypervisor``: ``VSphereHypervisor``, all of them together.

No Django here.
"""

from ..base import Placement
from .client import fault_message
from .hypervisor import VSphereHypervisor
from .provisioning import OWNER_KEY
from .tls import CertificatePinMismatch, fetch_thumbprint

__all__ = ["OWNER_KEY", "CertificatePinMismatch", "Placement", "VSphereHypervisor", "fault_message", "fetch_thumbprint"]
