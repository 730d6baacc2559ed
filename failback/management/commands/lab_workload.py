import signal
import threading

from django.conf import settings
from django.core.management.base import BaseCommand

from failback.hypervisors.lab_demo import run_workload


class Command(BaseCommand):
    help = "Keep writing to the lab's running VMs, like users do, so phase 2 has real changes to send."

    def add_arguments(self, parser):
        parser.add_argument("--rate", type=float, default=0.25, help="MiB/s written to each running VM")

    def handle(self, *args, rate, **options):
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        self.stdout.write(f"Lab workload: {rate} MiB/s to each running VM in {settings.LAB_ROOT}")
        run_workload(settings.LAB_ROOT, stop=stop, mib_per_s=rate)
