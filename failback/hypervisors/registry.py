"""Which hypervisor implementation serves a replica's platform."""

from django.conf import settings


def get_hypervisor(platform="lab"):
    if platform == "lab":
        from .lab import LabHypervisor

        return LabHypervisor(settings.LAB_ROOT)
    raise LookupError(f"No hypervisor for platform {platform!r}")
