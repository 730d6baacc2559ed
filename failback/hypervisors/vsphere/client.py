"""The SOAP session with vCenter: connect, log in, retry, and say what went wrong in vSphere's words.

Every SOAP call and file transfer has a socket timeout (``timeout``). Reads are retried up to
``retries`` times on transient errors (connection reset or refused, timeout, HTTP 5xx from the
proxy); calls that change something are retried only when the connection was refused (the request
never left). An expired session (``NotAuthenticated``) logs in again once. Errors surface as
``HypervisorError`` (``NotFound``, ``InsufficientSpace``) carrying vSphere's own fault message.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any, Self, TypeVar

from pyVmomi import SoapStubAdapter, VmomiSupport, vim, vmodl

from ..base import HypervisorError, InsufficientSpace, NotFound
from .tls import CertificatePinMismatch

T = TypeVar("T")

DEFAULT_VERSION = "vim.version.version9"  # vSphere 6.0: used when the server lists no versions


# Errors after which a call may be tried again: the network or the server's proxy hiccuped.
_TRANSIENT = (ConnectionError, TimeoutError, http.client.HTTPException, ssl.SSLEOFError)


# vSphere's own English texts for faults whose message a server may leave empty (vcsim does).
_FAULT_TEXT = {
    "InvalidPowerState": "The attempted operation cannot be performed in the current state ({state}).",
    "InvalidLogin": "Cannot complete login due to an incorrect user name or password.",
    "NotAuthenticated": "The session is not authenticated.",
    "DuplicateName": "The name '{name}' already exists.",
    "FileAlreadyExists": "Cannot complete the operation because the file or folder {file} already exists",
    "FileNotFound": "File {file} was not found",
    "ManagedObjectNotFound": "The object '{obj}' has already been deleted or has not been completely created",
    "ToolsUnavailable": "Cannot complete operation because VMware Tools is not running in this virtual machine.",
    "NotSupported": "The operation is not supported on the object.",
    "MethodNotFound": "The requested method {method} could not be found.",
    "InvalidDatastorePath": "Invalid datastore path '{datastorePath}'.",
    "InvalidArgument": "A specified parameter was not correct: {invalidProperty}",
    "InvalidDeviceSpec": "Invalid configuration for device '{deviceIndex}'.",
    "NoDiskSpace": "There is not enough space on datastore '{datastore}'.",
}


_STATE_LABEL = {"poweredOn": "Powered on", "poweredOff": "Powered off", "suspended": "Suspended"}


def _fault_name(fault: BaseException) -> str:
    return type(fault).__name__.rsplit(".", 1)[-1]


def fault_message(fault: BaseException) -> str:
    """vSphere's message for a fault: its own text when it has one, else vSphere's standard text."""
    msg = str(getattr(fault, "msg", "") or "").strip()
    if msg.startswith("*types."):  # vcsim puts the Go type name in a task's localizedMessage
        msg = ""
    if not msg:
        for m in getattr(fault, "faultMessage", None) or ():
            if getattr(m, "message", None):
                msg = m.message
                break
    if not msg:
        name = _fault_name(fault)
        template = _FAULT_TEXT.get(name)
        if template:
            fields: dict[str, Any] = {}
            for key in re.findall(r"{(\w+)}", template):
                value = getattr(fault, key, "")
                if key == "state":
                    value = _STATE_LABEL.get(getattr(fault, "existingState", ""), getattr(fault, "existingState", "?"))
                elif isinstance(value, vmodl.ManagedObject):
                    value = value._moId
                fields[key] = value
            msg = template.format(**fields)
        else:
            msg = f"vSphere fault {name}"
    return msg


def _fault_error(what: str, fault: BaseException) -> HypervisorError:
    name = _fault_name(fault)
    cls: type[HypervisorError] = HypervisorError
    if name == "ManagedObjectNotFound":
        cls = NotFound
    elif name == "NoDiskSpace":
        cls = InsufficientSpace
    err = cls(f"{what}: {fault_message(fault)}")
    err.fault = name  # type: ignore[attr-defined]
    return err


class Client:
    """The session part of ``VSphereHypervisor``: it sets ``host``, ``port``, ``user``, ``_password``,
    ``_ctx`` (TLS), ``timeout``, ``retries``, ``task_timeout`` and ``_lock`` before any call."""

    host: str
    port: int
    user: str
    _password: str
    _ctx: ssl.SSLContext
    timeout: float
    retries: int
    task_timeout: float
    _lock: threading.RLock
    _si: Any = None
    _content: Any = None
    _stub: Any = None

    @property
    def where(self) -> str:
        return f"vCenter {self.host}:{self.port}"

    def _api_version(self) -> str:
        """The newest API version both pyvmomi and the server speak (from vimServiceVersions.xml)."""
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self._ctx)
        try:
            conn.request("GET", "/sdk/vimServiceVersions.xml")
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            return DEFAULT_VERSION
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            return DEFAULT_VERSION
        offered = {v.text for v in root.iter("version") if v.text}
        for version in VmomiSupport.GetServiceVersions("vim25"):
            if VmomiSupport.versionIdMap.get(version) in offered:
                return version
        return DEFAULT_VERSION

    def _connect(self) -> None:
        version = self._api_version()
        stub = SoapStubAdapter(
            host=self.host,
            port=self.port,
            version=version,
            sslContext=self._ctx,
            httpConnectionTimeout=self.timeout,
            connectionPoolTimeout=60,
        )
        si = vim.ServiceInstance("ServiceInstance", stub)
        self._stub, self._content = stub, si.RetrieveContent()
        try:
            self._login()
        except BaseException:
            self._stub = self._content = None
            raise
        self._si = si

    def _login(self) -> None:
        try:
            self._content.sessionManager.Login(userName=self.user, password=self._password)
        except vim.fault.InvalidLogin as exc:
            raise _fault_error(f"{self.where} refused the login of {self.user!r}", exc) from None

    def _ensure(self) -> None:
        with self._lock:
            if self._si is None:
                self._guard(f"Connect to {self.where}", self._connect, idempotent=True, relogin=False)

    def close(self) -> None:
        """Log out (best effort) and drop the connections."""
        with self._lock:
            if self._content is not None:
                with contextlib.suppress(Exception):
                    self._content.sessionManager.Logout()
            if self._stub is not None:
                with contextlib.suppress(Exception):
                    self._stub.DropConnections()
            self._si = self._content = self._stub = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _guard(self, what: str, fn: Callable[[], T], *, idempotent: bool = True, relogin: bool = True) -> T:
        """Run one call: bounded retries on transient errors, one re-login, vSphere's message on failure."""
        attempt, relogged = 0, not relogin
        while True:
            try:
                return fn()
            except vim.fault.NotAuthenticated as exc:
                if relogged:
                    raise _fault_error(what, exc) from None
                relogged = True
                self._guard(f"Log in to {self.where} again", self._login, relogin=False)
            except (vmodl.MethodFault, vmodl.RuntimeFault) as exc:
                raise _fault_error(what, exc) from None
            except CertificatePinMismatch as exc:
                raise HypervisorError(
                    f"{what}: refusing to talk to {self.host}:{self.port}: {exc.args[0]}. If the certificate "
                    "was replaced on purpose, check the new thumbprint and pin it."
                ) from None
            except ssl.SSLCertVerificationError as exc:
                raise HypervisorError(
                    f"{what}: the certificate of {self.host}:{self.port} is not trusted "
                    f"({exc.verify_message or exc.reason}). Pin its SHA-256 thumbprint after checking it, "
                    "or install a certificate the system CA store trusts."
                ) from None
            except HypervisorError:
                raise
            except _TRANSIENT as exc:
                attempt += 1
                never_sent = isinstance(exc, ConnectionRefusedError)
                if attempt > self.retries or not (idempotent or never_sent):
                    raise HypervisorError(f"{what}: {self._describe(exc)}{self._attempts(attempt)}") from exc
                time.sleep(min(0.2 * 2 ** (attempt - 1), 2.0))
            except OSError as exc:
                raise HypervisorError(f"{what}: {self._describe(exc)}") from exc

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, ConnectionRefusedError):
            return f"cannot connect to {self.where}: connection refused"
        if isinstance(exc, TimeoutError):
            return f"{self.where} did not answer within {self.timeout:g} s"
        if isinstance(exc, ConnectionError | http.client.IncompleteRead | http.client.BadStatusLine | ssl.SSLEOFError):
            return f"lost the connection to {self.where} ({exc or type(exc).__name__})"
        if isinstance(exc, http.client.HTTPException):
            return f"{self.where} answered {exc or type(exc).__name__}"
        return f"cannot reach {self.where}: {exc}"

    @staticmethod
    def _attempts(n: int) -> str:
        return f" (after {n} attempts)" if n > 1 else ""

    def _call(self, what: str, fn: Callable[[], T], *, idempotent: bool = True) -> T:
        self._ensure()
        return self._guard(what, fn, idempotent=idempotent)

    def _wait(self, task: Any, what: str) -> Any:
        """Wait for a task (polling its info); its result, or its fault's message as HypervisorError."""
        deadline = time.monotonic() + self.task_timeout
        pause = 0.05
        while True:
            objs = self._call(
                what, lambda: self._collect([task], {vim.Task: ["info.state", "info.error", "info.result"]})
            )
            props = objs[0].props if objs else {}
            state = props.get("info.state")
            if state == "success":
                return props.get("info.result")
            if state == "error":
                fault = props.get("info.error")
                raise _fault_error(what, fault) if fault is not None else HypervisorError(f"{what}: the task failed.")
            if time.monotonic() >= deadline:
                raise HypervisorError(f"{what}: vCenter task {task._moId} still running after {self.task_timeout:g} s.")
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def about(self) -> str:
        """vCenter's product name and version (e.g. "VMware vCenter Server 8.0.2 build-…"), after a
        login and an authenticated call: the "Test connection" button."""
        self._call(f"Test the connection to {self.where}", lambda: self._si.CurrentTime())
        return self._content.about.fullName
