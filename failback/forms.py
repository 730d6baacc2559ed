from django import forms
from django.utils import timezone

from .choices import SwitchMode
from .workflow import REASON_MAX

DATETIME_HELP = "Server time zone ({tz})."


class ReasonField(forms.CharField):
    def __init__(self, **kwargs):
        super().__init__(required=False, max_length=REASON_MAX, label="Reason or ticket (optional)",
                         widget=forms.TextInput(attrs={"placeholder": "e.g. CHG-1234", "maxlength": REASON_MAX}), **kwargs)


class SwitchTimeField(forms.DateTimeField):
    def __init__(self, **kwargs):
        kwargs.setdefault("help_text", DATETIME_HELP.format(tz=timezone.get_current_timezone_name()))
        super().__init__(widget=forms.DateTimeInput(attrs={"type": "datetime-local", "step": 60}, format="%Y-%m-%dT%H:%M"),
                         input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S"], **kwargs)


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
    switch_mode = forms.ChoiceField(label="Switch", choices=SwitchMode.choices, initial=SwitchMode.MANUAL, widget=forms.RadioSelect)
    switch_at = SwitchTimeField(label="Switch at", required=False)
    power_on_after = forms.BooleanField(label="Power on the production VM after the switch", required=False, initial=True)
    reason = ReasonField()

    def __init__(self, *args, replica, inventory, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["vm_name"].initial = replica.source_name
        self.fields["target_host"].choices = [(h, h) for h in inventory.hosts]
        self.fields["target_datastore"].choices = [(name, f"{name} ({free / 2**30:,.0f} GiB free)") for name, free in inventory.datastores.items()]
        # Production goes back to production: pre-select a host and datastore the replica does not use.
        replica_stores = {d.datastore for d in replica.disks.all()}
        self.fields["target_host"].initial = next((h for h in inventory.hosts if h != replica.host), None)
        self.fields["target_datastore"].initial = next((d for d in inventory.datastores if d not in replica_stores), None)
        config = next((vm for vm in inventory.vms if vm.vm_id == replica.vm_id), None)
        self.nic_fields = []
        for nic in config.nics if config else ():
            name = f"net_{nic.key}"
            self.fields[name] = forms.ChoiceField(
                label=f"Network for {nic.key} (replica: {nic.network or 'disconnected'})", required=False,
                choices=[("", "Disconnected")] + [(n, n) for n in inventory.networks],
                initial=suggest_network(nic.network, inventory.networks))
            self.nic_fields.append((nic.network, name))

    def clean(self):
        data = super().clean()
        if data.get("switch_mode") == SwitchMode.SCHEDULED and not data.get("switch_at"):
            self.add_error("switch_at", "A scheduled switch needs a date and time.")
        data["network_map"] = {source: (data.get(field) or None) for source, field in self.nic_fields if source}
        return data


class ScheduleSwitchForm(forms.Form):
    switch_at = SwitchTimeField(label="Switch at")
    reason = ReasonField()


class ReasonForm(forms.Form):
    reason = ReasonField()
