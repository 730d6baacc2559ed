import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from failback.audit import Refused
from failback.choices import ReplicaState
from failback.hypervisors.lab import LabHypervisor
from failback.hypervisors.lab_demo import seed_demo
from failback.models import Replica
from failback.rehearsal import REPLICA_SUFFIX, reset_lab


class Command(BaseCommand):
    help = "Create the demo lab (replicas in Failover on real sparse disks) and a demo login; safe to run again."

    def add_arguments(self, parser):
        parser.add_argument("--count", type=int, default=12)
        parser.add_argument("--scale", type=float, default=1.0, help="disk size factor (tests use small ones)")
        parser.add_argument("--no-user", action="store_true", help="do not create the demo login")
        parser.add_argument(
            "--reset",
            action="store_true",
            help="put the lab back as seeded to rehearse again: replicas in Failover and powered on, production "
            "VMs deleted; ended failbacks and the audit trail are kept (refused while a failback runs)",
        )

    def handle(self, *args, count, scale, no_user, reset, **options):
        root = settings.LAB_ROOT
        lab = LabHypervisor(root)
        if not any(vm.name.endswith(REPLICA_SUFFIX) for vm in lab.inventory().vms):
            seed_demo(root, count=count, scale=scale)
            self.stdout.write(f"Lab created in {root}")
        added = self.import_replicas(lab)
        self.stdout.write(f"{added} replica(s) added; {Replica.objects.count()} in all")
        if reset:
            try:
                self.stdout.write(reset_lab(lab))
            except Refused as refused:
                raise CommandError(refused.message) from None
        if not no_user:
            self.demo_login()

    @transaction.atomic
    def import_replicas(self, lab):
        added = 0
        for vm in lab.inventory().vms:
            if (
                not vm.name.endswith(REPLICA_SUFFIX)
                or Replica.objects.filter(vm_id=vm.vm_id, platform=lab.name).exists()
            ):
                continue
            replica = Replica.objects.create(
                name=vm.name,
                source_name=vm.name.removesuffix(REPLICA_SUFFIX),
                platform=lab.name,
                vm_id=vm.vm_id,
                host=vm.host,
                site="DR",
                state=ReplicaState.FAILOVER,
            )
            replica.set_disks(vm.disks)
            added += 1
        return added

    def demo_login(self):
        # Dev convenience for the embedded default: the password lives in var/ (git-ignored, mode 600).
        path = settings.VAR_DIR / "demo_password"
        User = get_user_model()
        user = User.objects.filter(username="demo").first()
        if user is None or not path.exists():
            password = secrets.token_urlsafe(12)
            user = user or User(username="demo")
            user.set_password(password)
            user.save()
            user.groups.add(Group.objects.get(name="Operator"), Group.objects.get(name="Administrator"))
            path.touch(mode=0o600)
            path.write_text(password)
        self.stdout.write(self.style.SUCCESS(f"Demo login: user demo, password {path.read_text().strip()}"))
