"""What the lab benches share: a portal on a fresh SQLite database and lab in a temporary directory,
steps run inline (django-q2's sync mode) and an Operator to act as."""

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def lab_portal(*seed_args):
    """(temporary directory, LabHypervisor, operator) after ``seed_lab *seed_args --no-user``."""
    var = tempfile.mkdtemp(prefix="dr-bench-", dir=ROOT / "var" if (ROOT / "var").exists() else None)
    os.environ.update({"DR_PORTAL_VAR": var, "DJANGO_SETTINGS_MODULE": "dr_portal.settings", "LOG_LEVEL": "WARNING"})
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("REDIS_URL", None)
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command
    from django_q.conf import Conf

    from failback.hypervisors.lab import LabHypervisor

    Conf.SYNC = True
    call_command("migrate", verbosity=0)
    call_command("migrate", database="channels", verbosity=0)
    call_command("seed_lab", *seed_args, "--no-user", stdout=open(os.devnull, "w"))
    user = User.objects.create_user("bench")
    user.groups.add(Group.objects.get(name="Operator"))
    return var, LabHypervisor(settings.LAB_ROOT), user
