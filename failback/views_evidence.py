"""A session's signed evidence file, and the portal's public key to check it with."""

from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.http import require_GET

from . import evidence
from .models import FailbackSession


def evidence_response(session):
    """The evidence file as a download, byte for byte what ``verify_evidence`` checks."""
    response = HttpResponse(evidence.dumps(evidence.document(session)), content_type="application/json")
    response["Content-Disposition"] = f'attachment; filename="failback-{session.pk}-evidence.json"'
    return response


@require_GET
def session_evidence(request, pk):
    session = get_object_or_404(FailbackSession.objects.select_related("replica", "started_by", "plan"), pk=pk)
    return evidence_response(session)


@require_GET
def evidence_key(request):
    """The public key every evidence file is checked against (url-safe base64 of the raw Ed25519 key)."""
    key = evidence.public_key_b64()
    return HttpResponse(f"{key}\n", content_type="text/plain; charset=utf-8")
