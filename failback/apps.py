from django.apps import AppConfig
from django.db.models.signals import post_migrate

# Role -> permissions. Viewer reads everything (audit included); Operator runs failbacks;
# Administrator also manages users and settings in the admin site.
ROLES = {
    "Viewer": [],
    "Operator": ["failback.operate_failback"],
    "Administrator": [
        "failback.operate_failback",
        "failback.override_checks",
        "failback.add_vcenterconnection",
        "failback.change_vcenterconnection",
        "failback.view_vcenterconnection",
        "failback.change_approvalrule",  # which actions need a second person's approval
        "failback.change_notificationendpoint",  # notification endpoints and the deliveries page
    ],
}


def ensure_roles(sender, using="default", **kwargs):
    if using != "default":
        return
    from django.contrib.auth.models import Group, Permission

    for role, perms in ROLES.items():
        group, _ = Group.objects.get_or_create(name=role)
        for perm in perms:
            app_label, codename = perm.split(".")
            permission = Permission.objects.filter(content_type__app_label=app_label, codename=codename).first()
            if permission:
                group.permissions.add(permission)


def ensure_schedules(sender, using="default", **kwargs):
    if using != "default":
        return
    from django_q.models import Schedule

    # Every minute: queue again any step whose worker died (see watchdog.recover_stalled).
    Schedule.objects.update_or_create(
        name="failback-watchdog",
        defaults={"func": "failback.tasks.watchdog", "schedule_type": Schedule.MINUTES, "minutes": 1, "repeats": -1},
    )
    # Every minute: catch-up syncs (when due) and fresh switch-window predictions for Ready-to-switch sessions.
    Schedule.objects.update_or_create(
        name="failback-readiness",
        defaults={"func": "failback.tasks.readiness", "schedule_type": Schedule.MINUTES, "minutes": 1, "repeats": -1},
    )
    # Every minute: notifications of moments no audit row marks, and deliveries whose task was lost.
    Schedule.objects.update_or_create(
        name="failback-notifications",
        defaults={
            "func": "failback.notifications.tasks.periodic",
            "schedule_type": Schedule.MINUTES,
            "minutes": 1,
            "repeats": -1,
        },
    )


class FailbackConfig(AppConfig):
    name = "failback"
    verbose_name = "Failback"

    def ready(self):
        from . import signals  # noqa: F401  (login events into the audit trail)

        post_migrate.connect(ensure_roles, sender=self)
        post_migrate.connect(ensure_schedules, sender=self)
