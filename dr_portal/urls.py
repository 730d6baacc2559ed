from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from failback import api, health, metrics

urlpatterns = [
    # Log in and out only: no anonymous password-reset pages (users are managed by administrators; no mail is sent).
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    # For load balancers and monitoring, without a login: alive, ready, and Prometheus' scrape (token or address).
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics.metrics, name="metrics"),
    path("admin/", admin.site.urls),
    path("api/v1/", api.urls()),
    path("", include("failback.urls")),
]
