"""Virtualisation platforms behind one interface (``base.Hypervisor``): ``lab`` and ``vsphere``."""
