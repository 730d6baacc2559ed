from django.contrib import admin

from .models import AuditEvent, FailbackSession, Replica


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """Read-only for everyone, superusers included: the trail is append-only."""

    list_display = ["at", "actor_name", "action", "outcome", "from_state", "to_state", "session", "replica"]
    list_filter = ["outcome", "action"]
    search_fields = ["detail", "actor_name"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Replica)
class ReplicaAdmin(admin.ModelAdmin):
    list_display = ["name", "source_name", "state", "host", "platform"]
    readonly_fields = ["state"]  # states change only through the workflow


@admin.register(FailbackSession)
class FailbackSessionAdmin(admin.ModelAdmin):
    list_display = ["id", "replica", "status", "started_by", "created_at"]

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
