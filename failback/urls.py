from django.urls import path

from . import views, views_connections, views_evidence, views_notifications, views_plans, views_tokens

app_name = "failback"
urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("replicas/", views.replica_list, name="replicas"),
    path("replicas/<int:pk>/failback/", views.start_failback, name="start"),
    path("replicas/<int:pk>/failback/pickers/", views.start_failback_pickers, name="start_pickers"),
    path("replicas/<int:pk>/failback/checks/", views.start_failback_checks, name="start_checks"),
    path("sessions/", views.session_list, name="sessions"),
    path("sessions/<int:pk>/", views.session_detail, name="session"),
    path("sessions/<int:pk>/report/", views.session_report, name="report"),
    path("sessions/<int:pk>/evidence.json", views_evidence.session_evidence, name="evidence"),
    path("evidence/public-key", views_evidence.evidence_key, name="evidence_key"),
    path("sessions/<int:pk>/<str:action>/", views.session_action, name="action"),
    path("plans/", views_plans.plan_list, name="plans"),
    path("plans/new/", views_plans.plan_new, name="plan_new"),
    path("plans/<int:pk>/", views_plans.plan_detail, name="plan"),
    path("plans/<int:pk>/<str:action>/", views_plans.plan_action, name="plan_action"),
    path("audit/", views.audit_list, name="audit"),
    path("audit/export.<str:fmt>", views.audit_export, name="audit_export"),
    path("replicas/<int:pk>/failover/", views_connections.declare_failover, name="declare_failover"),
    path("replicas/<int:pk>/power/<str:to>/", views.lab_power, name="lab_power"),
    path("account/tokens/", views_tokens.token_list, name="tokens"),
    path("account/tokens/<int:pk>/revoke/", views_tokens.token_revoke, name="token_revoke"),
    path("account/notifications/", views_notifications.my_notifications, name="my_notifications"),
    path("notifications/", views_notifications.endpoint_list, name="notify_endpoints"),
    path("notifications/new/", views_notifications.endpoint_edit, name="notify_endpoint_new"),
    path("notifications/<int:pk>/", views_notifications.endpoint_edit, name="notify_endpoint"),
    path("notifications/<int:pk>/delete/", views_notifications.endpoint_delete, name="notify_endpoint_delete"),
    path("notifications/deliveries/", views_notifications.delivery_list, name="notify_deliveries"),
    path("connections/", views_connections.connection_list, name="connections"),
    path("connections/new/", views_connections.connection_edit, name="connection_new"),
    path("connections/<int:pk>/", views_connections.connection_detail, name="connection"),
    path("connections/<int:pk>/edit/", views_connections.connection_edit, name="connection_edit"),
    path("connections/<int:pk>/<str:action>/", views_connections.connection_action, name="connection_action"),
]
