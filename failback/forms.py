import re
from dataclasses import fields
from datetime import date

from django import forms
from django.utils import timezone

from . import hooks
from .choices import CommitPolicy, GuestGate, SessionStatus, SwitchMode
from .connections import normalise_thumbprint
from .starting import dr_hosts, failback_hosts
from .transports import CONSEQUENCES as TRANSPORT_CONSEQUENCES
from .workflow import REASON_MAX, StartOptions

DATETIME_HELP = "{tz} time"
DB_INT_MAX = 2**31 - 1  # ids and counts fit a 32-bit column on every database we support
# Filter dates: a day either side must still be a date (Python's ends at 9999-12-31) in any time zone.
DATE_MIN, DATE_MAX = date(1970, 1, 1), date(9998, 12, 31)


class FilterDateField(forms.DateField):
    """A date to filter by, within the range the filters can compute with."""

    def __init__(self, **kwargs):
        super().__init__(
            required=False, widget=forms.DateInput(attrs={"type": "date", "min": DATE_MIN, "max": DATE_MAX}), **kwargs
        )

    def validate(self, value):
        super().validate(value)
        if value is not None and not DATE_MIN <= value <= DATE_MAX:
            raise forms.ValidationError(f"Enter a date between {DATE_MIN} and {DATE_MAX}.", code="out_of_range")


class IdField(forms.IntegerField):
    """An id typed into a filter: a whole number the database's integer can hold."""

    def __init__(self, **kwargs):
        super().__init__(required=False, min_value=1, max_value=DB_INT_MAX, **kwargs)


class SessionFilterForm(forms.Form):
    """The session list's filters (the page's links and the API's query)."""

    status = forms.ChoiceField(label="Status", required=False, choices=[("", "Any")] + list(SessionStatus.choices))
    replica = IdField(label="Replica #")
    plan = IdField(label="Plan #")


class ReplicaFilterForm(forms.Form):
    """The replica list's search and filters. Text fields refuse NUL characters (PostgreSQL cannot compare them)."""

    q = forms.CharField(label="Search", required=False, max_length=200)
    state = forms.CharField(label="State", required=False, max_length=50)
    site = forms.CharField(label="Site", required=False, max_length=100)
    host = forms.CharField(label="Host", required=False, max_length=200)
    sort = forms.CharField(label="Sort", required=False, max_length=50)


class ReasonField(forms.CharField):
    def __init__(self, **kwargs):
        super().__init__(
            required=False,
            max_length=REASON_MAX,
            label=kwargs.pop("label", "Reason or ticket (optional)"),
            widget=forms.TextInput(attrs={"placeholder": "e.g. CHG-1234", "maxlength": REASON_MAX}),
            **kwargs,
        )


class SwitchTimeField(forms.DateTimeField):
    def __init__(self, **kwargs):
        kwargs.setdefault("help_text", DATETIME_HELP.format(tz=timezone.get_current_timezone_name()))
        super().__init__(
            widget=forms.DateTimeInput(attrs={"type": "datetime-local", "step": 60}, format="%Y-%m-%dT%H:%M"),
            input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S"],
            **kwargs,
        )


def pools_for_host(placement, host):
    """Resource pools of the host's cluster (or of the standalone host), as (id, path) choices."""
    owner = placement.hosts.get(host) or host
    return sorted(
        ((pid, path) for pid, path in placement.resource_pools.items() if owner and owner in path.split("/")),
        key=lambda kv: kv[1],
    )


def suggest_network(source, networks):
    """Pre-select the production twin of a DR network (dr-net -> prod-net) when there is one."""
    if not source:
        return ""
    for twin in (source.replace("dr-", "prod-", 1), source.replace("-dr", "-prod", 1)):
        if twin != source and twin in networks:
            return twin
    return source if source in networks else ""


class StartFailbackForm(forms.Form):
    vm_name = forms.CharField(label="Production VM name", max_length=80)
    target_host = forms.ChoiceField(label="Target host")
    target_datastore = forms.ChoiceField(label="Datastore")
    switch_mode = forms.ChoiceField(
        label="Switch", choices=SwitchMode.choices, initial=SwitchMode.MANUAL, widget=forms.RadioSelect
    )
    switch_at = SwitchTimeField(label="Switch at", required=False)
    power_on_after = forms.BooleanField(
        label="Power on the production VM after the switch", required=False, initial=True
    )
    bandwidth_mbps = forms.IntegerField(
        label="Bandwidth limit, MB/s (optional)",
        required=False,
        min_value=1,
        max_value=100_000,
        help_text="Megabytes per second: 1 MB/s = 10^6 bytes/s, so 3 MB/s is 2.9 MiB/s, the unit the progress "
        "tables and the chart show. Leave empty to copy as fast as the disks allow.",
    )
    commit_policy = forms.ChoiceField(
        label="After the switch",
        choices=CommitPolicy.choices,
        initial=CommitPolicy.NONE,
        required=False,
        widget=forms.RadioSelect,
    )
    commit_after_min = forms.IntegerField(
        label="Minutes in Failback before the automatic action",
        required=False,
        min_value=1,
        max_value=7 * 24 * 60,
        help_text="The countdown is shown on the session and the dashboard, and can be stopped.",
    )
    override_checks = forms.BooleanField(
        required=False, label="Override failed checks (Administrator; the reason is required)"
    )
    reason = ReasonField(label="Why fail back now (reason or ticket, optional)")

    def __init__(self, *args, replica, inventory, placement=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["vm_name"].initial = replica.source_name
        hosts = failback_hosts(replica, inventory)  # production only: the DR site's hosts are not offered
        self.fields["target_host"].choices = [(h, h) for h in hosts]
        self.fields["target_datastore"].choices = [
            (name, f"{name} ({free / 2**30:,.0f} GiB free)") for name, free in inventory.datastores.items()
        ]
        # Production goes back to production: pre-select a host and datastore the replica does not use.
        replica_stores = {d.datastore for d in replica.disks.all()}
        self.fields["target_host"].initial = next(iter(hosts), None)
        self.fields["target_datastore"].initial = next(
            (d for d in inventory.datastores if d not in replica_stores), None
        )
        config = next((vm for vm in inventory.vms if vm.vm_id == replica.vm_id), None)
        self.nic_fields = []
        for nic in config.nics if config else ():
            name = f"net_{nic.key}"
            self.fields[name] = forms.ChoiceField(
                label=f"Network for {nic.key} (replica: {nic.network or 'disconnected'})",
                required=False,
                choices=[("", "Disconnected")] + [(n, n) for n in inventory.networks],
                initial=suggest_network(nic.network, inventory.networks),
            )
            self.nic_fields.append((nic.network, name))
        if placement is not None and (
            placement.resource_pools or placement.folders
        ):  # vSphere: where in the inventory the VM goes
            host = self.data.get("target_host") or self.fields["target_host"].initial
            self.fields["resource_pool"] = forms.ChoiceField(
                label="Resource pool",
                required=False,
                choices=[("", "Default pool of the host or cluster")] + pools_for_host(placement, host),
            )
            self.fields["folder"] = forms.ChoiceField(
                label="VM folder",
                required=False,
                choices=[("", "The datacenter's VM folder")] + sorted(placement.folders.items(), key=lambda kv: kv[1]),
            )
        self.hook_fields = hook_fields(self, "Hooks")
        # Where the VM goes and how it is wired first, then when and how it switches; the reason last.
        self.order_fields(
            ["vm_name", "target_host", "resource_pool", "folder", "target_datastore"]
            + [name for _, name in self.nic_fields]
            + ["switch_mode", "switch_at", "power_on_after", "bandwidth_mbps", "commit_policy", "commit_after_min"]
            + self.hook_fields
            + ["override_checks", "reason"]
        )

    def clean(self):
        data = super().clean()
        if data.get("switch_mode") == SwitchMode.SCHEDULED and not data.get("switch_at"):
            self.add_error("switch_at", "A scheduled switch needs a date and time.")
        data["commit_policy"] = data.get("commit_policy") or CommitPolicy.NONE
        if data["commit_policy"] != CommitPolicy.NONE and not data.get("commit_after_min"):
            self.add_error("commit_after_min", "An automatic commit or undo needs a number of minutes.")
        data["network_map"] = {source: (data.get(field) or None) for source, field in self.nic_fields if source}
        data.setdefault("resource_pool", "")
        data.setdefault("folder", "")
        data["hooks"] = chosen_hooks(self)  # None: the allow-list's defaults for the replica
        return data

    def options(self):
        """The cleaned form as the workflow's StartOptions (the API and plans build the same object)."""
        return StartOptions(
            **{f.name: self.cleaned_data[f.name] for f in fields(StartOptions) if f.name in self.cleaned_data}
        )


class ScheduleSwitchForm(forms.Form):
    switch_at = SwitchTimeField(label="Switch at")
    reason = ReasonField()


class ReasonForm(forms.Form):
    reason = ReasonField()


class SwitchForm(ReasonForm):
    override_checks = forms.BooleanField(
        required=False, label="Override failed checks (Administrator; the reason is required)"
    )


class WindowsForm(ReasonForm):
    """Maintenance windows one a line (windows.parse_line) and a downtime budget; both empty: a manual switch."""

    windows = forms.CharField(
        required=False,
        max_length=2000,
        label="Maintenance windows, one a line",
        help_text="once 2026-12-05 02:00-04:00 Europe/Paris · weekly sat,sun 02:00-04:00 Europe/Paris · daily 01:00-05:00 UTC",
        widget=forms.Textarea(attrs={"rows": 3}),
    )
    downtime_budget_s = forms.IntegerField(
        required=False, label="Downtime budget (seconds)", help_text="The longest predicted downtime to switch with"
    )

    def clean_windows(self):
        from .windows import WindowError, parse_line

        parsed = []
        for n, line in enumerate((self.cleaned_data.get("windows") or "").splitlines(), 1):
            if line.strip():
                try:
                    parsed.append(parse_line(line.strip()))
                except WindowError as bad:
                    raise forms.ValidationError(f"Line {n}: {bad}")
        return parsed


class CancelForm(ReasonForm):
    keep_production_vm = forms.BooleanField(
        required=False, label="Keep the production VM for a retry (the next failback sends only what differs)"
    )


HOST = re.compile(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]")


class ConnectionForm(forms.ModelForm):
    password = forms.CharField(
        widget=forms.PasswordInput(render_value=False),
        required=False,
        max_length=500,
        help_text="Stored encrypted; never shown again. Leave blank to keep the current one.",
    )
    datastore_paths_text = forms.CharField(
        label="Datastore mounts (direct transport)",
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="One per line: datastore name = local path on the worker host, e.g. ds-01 = /mnt/ds-01",
    )

    class Meta:
        from .models import VCenterConnection

        model = VCenterConnection
        fields = [
            "name",
            "host",
            "port",
            "username",
            "tls_mode",
            "thumbprint",
            "transport",
            "replica_suffix",
            "replica_attribute",
            "sync_minutes",
        ]
        labels = {"replica_suffix": "Replica name suffix", "replica_attribute": "Replica custom attribute"}
        help_texts = {
            "replica_attribute": "Optional: a VM custom attribute whose value names the source workload.",
            "transport": " ".join(f"{name.upper()}: {text}" for name, text in TRANSPORT_CONSEQUENCES.items()),
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["datastore_paths_text"].initial = "\n".join(
            f"{k} = {v}" for k, v in (self.instance.datastore_paths or {}).items()
        )
        if not self.instance.pk:
            self.fields["password"].required = True
            self.fields["password"].help_text = "Stored encrypted; never shown again."

    def clean_host(self):
        host = self.cleaned_data["host"].strip()
        if not HOST.fullmatch(host):
            raise forms.ValidationError("Give the vCenter's DNS name or IP address (an IPv6 address in [brackets]).")
        return host

    def clean_sync_minutes(self):
        minutes = self.cleaned_data["sync_minutes"]
        if not 1 <= minutes <= 10_080:
            raise forms.ValidationError("Sync every 1 to 10080 minutes (a week).")
        return minutes

    def clean_port(self):
        port = self.cleaned_data["port"]
        if not 1 <= port <= 65535:
            raise forms.ValidationError("A port is between 1 and 65535.")
        return port

    def clean_thumbprint(self):
        value = self.cleaned_data["thumbprint"].strip()
        try:
            return normalise_thumbprint(value) if value else ""
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean_datastore_paths_text(self):
        paths = {}
        for number, line in enumerate(self.cleaned_data["datastore_paths_text"].splitlines(), 1):
            if not line.strip():
                continue
            name, sep, path = line.partition("=")
            if not sep or not name.strip() or not path.strip().startswith("/"):
                raise forms.ValidationError(f"Line {number}: write 'datastore = /absolute/path'.")
            paths[name.strip()] = path.strip()
        return paths

    def save(self, commit=False):
        connection = super().save(commit=False)
        connection.datastore_paths = self.cleaned_data["datastore_paths_text"]
        return connection


class PairReplicaForm(forms.Form):
    vm_id = forms.CharField(label="Replica VM", max_length=100)
    source_name = forms.CharField(label="Source workload name", max_length=200)


def hook_fields(form, label):
    """One checkbox list per hook point, of the allow-list's hooks (none when there is no allow-list)."""
    try:
        names = sorted(hooks.allowed())
    except hooks.HookConfigError:  # the start refuses with the reason; the form offers none
        names = []
    if not names:
        return []
    for point, where in hooks.POINTS.items():
        form.fields[f"hooks_{point}"] = forms.MultipleChoiceField(
            label=f"{label}: {where}",
            choices=[(n, n) for n in names],
            required=False,
            widget=forms.CheckboxSelectMultiple,
            help_text="None ticked at any point: each replica's defaults from the allow-list."
            if point == "before_phase1"
            else "",
        )
    return [f"hooks_{point}" for point in hooks.POINTS]


def chosen_hooks(form):
    """{point: [names]} ticked, or None when none is (each replica's defaults)."""
    chosen = {p: form.cleaned_data.get(f"hooks_{p}") or [] for p in hooks.POINTS if f"hooks_{p}" in form.fields}
    return {p: n for p, n in chosen.items() if n} or None


class PlanForm(forms.Form):
    name = forms.CharField(label="Plan name", max_length=100)
    concurrency = forms.IntegerField(label="Phase 1 copies at once", min_value=1, max_value=20, initial=2)
    switch_mode = forms.ChoiceField(
        label="Switch (all members together)",
        choices=SwitchMode.choices,
        initial=SwitchMode.MANUAL,
        widget=forms.RadioSelect,
    )
    switch_at = SwitchTimeField(label="Switch at", required=False)
    power_on_after = forms.BooleanField(
        label="Power on the production VMs after the switch", required=False, initial=True
    )
    power_on_delay_s = forms.IntegerField(label="Seconds between power-ons", min_value=0, max_value=3600, initial=0)
    guest_gate = forms.ChoiceField(
        label="Before the next member powers on, wait until",
        choices=GuestGate.choices,
        initial=GuestGate.NONE,
        required=False,
        widget=forms.RadioSelect,
        help_text="Not met in time: the members not yet switched fail their switch and their replicas keep running.",
    )
    guest_gate_address = forms.CharField(
        label="TCP address (host:port)",
        max_length=200,
        required=False,
        help_text="For the TCP gate; {vm} stands for each member's production VM name, e.g. {vm}.corp.example:443.",
    )
    guest_gate_timeout_s = forms.IntegerField(
        label="Gate timeout (seconds)", min_value=1, max_value=3600, initial=300, required=False
    )
    reason = ReasonField()

    def __init__(self, *args, replicas, inventory, **kwargs):
        super().__init__(*args, **kwargs)
        self.hook_fields = hook_fields(self, "Hooks for every member")
        self.rows = []
        dr = dr_hosts(replicas[0]) if replicas else set()  # production only, as in the start wizard
        hosts = [(h, h) for h in inventory.hosts if h not in dr]
        stores = [(name, f"{name} ({free / 2**30:,.0f} GiB free)") for name, free in inventory.datastores.items()]
        configs = {vm.vm_id: vm for vm in inventory.vms}
        for position, replica in enumerate(replicas, 1):
            prefix = f"m{replica.pk}"
            replica_stores = {d.datastore for d in replica.disks.all()}
            self.fields[f"{prefix}_order"] = forms.IntegerField(
                label=f"Boot order of {replica.name}", min_value=1, max_value=999, initial=position
            )
            self.fields[f"{prefix}_vm_name"] = forms.CharField(
                label=f"Production VM name for {replica.name}", max_length=80, initial=replica.source_name
            )
            self.fields[f"{prefix}_host"] = forms.ChoiceField(
                label=f"Target host for {replica.name}",
                choices=hosts,
                initial=next((h for h, _ in hosts), None),
            )
            self.fields[f"{prefix}_datastore"] = forms.ChoiceField(
                label=f"Datastore for {replica.name}",
                choices=stores,
                initial=next((d for d in inventory.datastores if d not in replica_stores), None),
            )
            for field in ("order", "vm_name", "host", "datastore"):  # the table shows no <label>: name each control
                self.fields[f"{prefix}_{field}"].widget.attrs["aria-label"] = self.fields[f"{prefix}_{field}"].label
            config = configs.get(replica.vm_id)
            networks = {
                nic.network: suggest_network(nic.network, inventory.networks) or None
                for nic in (config.nics if config else ())
                if nic.network
            }
            self.rows.append(
                {
                    "replica": replica,
                    "prefix": prefix,
                    "networks": networks,
                    "fields": [self[f"{prefix}_{n}"] for n in ("order", "vm_name", "host", "datastore")],
                }
            )

    def clean(self):
        data = super().clean()
        if data.get("switch_mode") == SwitchMode.SCHEDULED and not data.get("switch_at"):
            self.add_error("switch_at", "A scheduled switch needs a date and time.")
        return data

    BASE = (
        "name",
        "concurrency",
        "switch_mode",
        "switch_at",
        "power_on_after",
        "power_on_delay_s",
        "guest_gate",
        "guest_gate_address",
        "guest_gate_timeout_s",
    )

    def plan_fields(self):
        return [self[name] for name in (*self.BASE, *self.hook_fields, "reason")]

    def hooks(self):
        return chosen_hooks(self)

    def members(self):
        """The members in boot order, as plans.start_plan wants them."""
        data = self.cleaned_data
        rows = sorted(self.rows, key=lambda r: (data[f"{r['prefix']}_order"], r["replica"].name))
        return [
            {
                "replica_id": r["replica"].pk,
                "vm_name": data[f"{r['prefix']}_vm_name"],
                "target_host": data[f"{r['prefix']}_host"],
                "target_datastore": data[f"{r['prefix']}_datastore"],
                "network_map": r["networks"],
            }
            for r in rows
        ]
