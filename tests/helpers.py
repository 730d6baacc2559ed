"""Small helpers shared by the tests (test data only; nothing here stands in for project code)."""

from contextlib import closing

from django.utils import timezone

from failback import workflow
from failback.choices import ReplicaState, SessionStatus, SwitchMode
from failback.models import FailbackSession, Replica


def replica_named(part):
    return Replica.objects.filter(name__contains=part).first()


def network_map(replica):
    from failback.hypervisors.registry import hypervisor_for

    nics = hypervisor_for(replica).vm_config(replica.vm_id).nics
    return {nic.network: nic.network.replace("dr-", "prod-") for nic in nics if nic.network}


def start(actor, replica, *, switch_mode=SwitchMode.MANUAL, **overrides):
    options = {
        "network_map": network_map(replica),
        "vm_name": f"{replica.source_name}-prod",
        "target_host": "esx-prod-01",
        "target_datastore": "prod-ds-01",
        "switch_mode": switch_mode,
        "power_on_after": True,
    }
    options.update(overrides)
    return workflow.start_failback(actor, replica.pk, **options)


def put_session_in(session, status):
    """Test set-up: place a session (and its replica) where a given status would have left them."""
    replica_state = {
        SessionStatus.READY_TO_SWITCH: ReplicaState.READY_TO_SWITCH,
        SessionStatus.SWITCHING: ReplicaState.READY_TO_SWITCH,
        SessionStatus.FAILBACK: ReplicaState.FAILBACK,
        SessionStatus.COMMITTING: ReplicaState.FAILBACK,
        SessionStatus.UNDOING: ReplicaState.FAILBACK,
        SessionStatus.COMMITTED: ReplicaState.READY,
    }.get(status, ReplicaState.FAILOVER)
    session = FailbackSession.objects.get(pk=session.pk)
    built = {
        SessionStatus.READY_TO_SWITCH,
        SessionStatus.SWITCHING,
        SessionStatus.FAILBACK,
        SessionStatus.COMMITTING,
        SessionStatus.UNDOING,
    }
    if status in built and not session.production_vm_id:  # phase 1 would have built it (with its owner tag)
        from failback.hypervisors.registry import hypervisor_for

        replica = Replica.objects.get(pk=session.replica_id)
        with closing(hypervisor_for(replica)) as hv:
            session.production_vm_id = hv.create_vm_like(
                replica.vm_id,
                name=session.vm_name,
                host=session.target_host,
                datastore=session.target_datastore,
                network_map=session.network_map,
                owner_tag=session.owner_tag,
            )
        FailbackSession.objects.filter(pk=session.pk).update(production_vm_id=session.production_vm_id)
    switched = {SessionStatus.FAILBACK, SessionStatus.COMMITTING, SessionStatus.UNDOING, SessionStatus.COMMITTED}
    if status in switched and session.power_on_after and not session.production_on_at:  # the switch powered it on
        FailbackSession.objects.filter(pk=session.pk).update(production_on_at=timezone.now())
    FailbackSession.objects.filter(pk=session.pk).update(status=status)
    Replica.objects.filter(pk=session.replica_id).update(state=replica_state)
    return FailbackSession.objects.get(pk=session.pk)
