from django.urls import path

from . import views

app_name = "failback"
urlpatterns = [
    path("", views.replica_list, name="replicas"),
    path("replicas/<int:pk>/failback/", views.start_failback, name="start"),
    path("sessions/", views.session_list, name="sessions"),
    path("sessions/<int:pk>/", views.session_detail, name="session"),
    path("sessions/<int:pk>/<str:action>/", views.session_action, name="action"),
    path("audit/", views.audit_list, name="audit"),
]
