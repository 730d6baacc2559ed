"""What each disk transport sends, in phase 1 and in the switch: shown where an Administrator chooses
a connection's transport and in the start wizard's review, from this one table."""

CONSEQUENCES = {
    "direct": (
        "Phase 1 copies only the allocated data; the switch sends only the changed blocks. "
        "Needs every datastore mounted on the worker host (NFS, or a SAN path to the flat files)."
    ),
    "network": (
        "Both phase 1 and the switch send every disk whole through the datastore HTTP interface (it cannot "
        "write ranges): the switch window is a full copy, and the production disks come out fully allocated."
    ),
    "nbd": (
        "Like direct: phase 1 reads only the allocated extents (NBD block status) and keeps holes; the switch "
        "sends only the changed blocks. The worker starts one nbdkit per disk: the vddk plugin with VMware's VDDK "
        "(FAILBACK_VDDK_LIBDIR; not shipped by Debian, see README), else the file plugin on a mounted datastore."
    ),
}


def consequence(transport: str) -> str:
    return CONSEQUENCES.get(transport, "")
