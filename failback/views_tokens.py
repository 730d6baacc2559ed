"""The API tokens page: a logged-in user lists, creates and revokes their own tokens (rules in failback.tokens)."""

from django import forms
from django.contrib import messages
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from . import tokens
from .workflow import Refused


class TokenForm(forms.Form):
    name = forms.CharField(
        label="Token name", max_length=tokens.NAME_MAX, help_text="What will use it, e.g. the change-window script."
    )


@never_cache  # the response to a create holds the token in clear: no cache may keep it
@require_http_methods(["GET", "POST"])
def token_list(request):
    form = TokenForm(request.POST or None)
    created = secret = error = None
    if request.method == "POST" and form.is_valid():
        try:
            created, secret = tokens.issue(request.user, request.user, form.cleaned_data["name"])
        except Refused as refused:
            error = refused.message
        else:
            form = TokenForm()
    return render(
        request,
        "failback/tokens.html",
        {"form": form, "created": created, "secret": secret, "error": error, "tokens": request.user.api_tokens.all()},
        status=400 if request.method == "POST" and secret is None else 200,
    )


@require_POST
def token_revoke(request, pk):
    try:
        row = tokens.revoke(request.user, pk)
    except Refused as refused:
        messages.error(request, refused.message)
    else:
        messages.success(request, f"Token {row.prefix} ({row.name}) revoked: it no longer works.")
    return redirect("failback:tokens")
