from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from chat_app.views import chat_page
from omni.api import api
from omni.metrics_view import metrics_view

urlpatterns = [
    path("", chat_page, name="chat"),
    path("accounts/login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/", api.urls),
    path("metrics", metrics_view, name="metrics"),
]
