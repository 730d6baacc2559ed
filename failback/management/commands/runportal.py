import os
import signal
import subprocess
import sys
import time

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Run the web server (Daphne), the django-q2 worker and the lab workload together; Ctrl-C stops all."

    def add_arguments(self, parser):
        parser.add_argument("--bind", default="127.0.0.1", help="address the web server listens on (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=8000, help="port of the web server (default 8000)")
        parser.add_argument("--no-workload", action="store_true", help="do not run the lab workload generator")

    def handle(self, *args, bind, port, no_workload, **options):
        manage = [sys.executable, "manage.py"]
        commands = {
            "web": [sys.executable, "-m", "daphne", "-b", bind, "-p", str(port), "dr_portal.asgi:application"],
            "worker": manage + ["qcluster"],
        }
        if not no_workload:
            commands["workload"] = manage + ["lab_workload"]
        procs = {name: subprocess.Popen(cmd, env=os.environ.copy()) for name, cmd in commands.items()}
        self.stdout.write(
            self.style.SUCCESS(f"Portal on http://{bind}:{port}/  (Ctrl-C stops web, worker and workload)")
        )
        stopping = False

        def stop(*_):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            while not stopping:
                dead = [name for name, p in procs.items() if p.poll() is not None]
                if dead:
                    self.stderr.write(f"{', '.join(dead)} exited; stopping the others")
                    break
                time.sleep(0.5)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 15
            for p in procs.values():
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
