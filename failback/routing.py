from django.urls import path

from .consumers import DashboardConsumer, PlanConsumer, SessionConsumer

websocket_urlpatterns = [
    path("ws/dashboard/", DashboardConsumer.as_asgi()),
    path("ws/sessions/<int:pk>/", SessionConsumer.as_asgi()),
    path("ws/plans/<int:pk>/", PlanConsumer.as_asgi()),
]
