from django.apps import AppConfig
from django.db.models.signals import post_migrate

# Role -> permissions. Viewer reads everything (audit included); Operator runs failbacks;
# Administrator also manages users and settings in the admin site.
ROLES = {
    "Viewer": [],
    "Operator": ["failback.operate_failback"],
    "Administrator": ["failback.operate_failback", "failback.add_vcenterconnection", "failback.change_vcenterconnection",
                      "failback.view_vcenterconnection"],
}


def ensure_roles(sender, **kwargs):
    from django.contrib.auth.models import Group, Permission

    for role, perms in ROLES.items():
        group, _ = Group.objects.get_or_create(name=role)
        for perm in perms:
            app_label, codename = perm.split(".")
            permission = Permission.objects.filter(content_type__app_label=app_label, codename=codename).first()
            if permission:
                group.permissions.add(permission)


class FailbackConfig(AppConfig):
    name = "failback"
    verbose_name = "Failback"

    def ready(self):
        post_migrate.connect(ensure_roles, sender=self)
