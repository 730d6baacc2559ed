// Guest tools for the simulator: govmomi 0.24's vcsim reports no tools on any VM, yet powers a VM off
// at once on ShutdownGuest (vSphere refuses ShutdownGuest without running tools).
//
// A test gives a VM a guest with the VM's own extraConfig, through ReconfigVM_Task as for any setting:
//
//	vcsim.guest.tools          "running" or "notRunning"
//	vcsim.guest.shutdownDelay  milliseconds the guest OS takes to shut down after ShutdownGuest,
//	                           or "never" (a guest that hangs on shutdown); 0 when unset
//
// Such a VM reports guest.toolsRunningStatus guestToolsRunning (powered on, tools running) or
// guestToolsNotRunning, guest.toolsStatus toolsOk or toolsNotRunning, and guestHeartbeatStatus green or
// gray. ShutdownGuest answers at once, as vSphere does: with ToolsUnavailable when the tools are not
// running, InvalidPowerState when the VM is not powered on (vcsim's own answer), otherwise success, the
// VM powering off after the delay (never, for "never"). A VM without these keys keeps vcsim's own behaviour.
package main

import (
	"bytes"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strconv"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

type guestModel struct {
	set     bool // the VM has a guest model at all
	running bool // tools running (when powered on)
	delay   time.Duration
	hang    bool
}

func guestOf(vm *simulator.VirtualMachine) guestModel {
	var g guestModel
	if vm.Config == nil {
		return g
	}
	for _, o := range vm.Config.ExtraConfig {
		v := o.GetOptionValue()
		s, _ := v.Value.(string)
		switch v.Key {
		case "vcsim.guest.tools":
			g.set, g.running = true, s == "running"
		case "vcsim.guest.shutdownDelay":
			g.set = true
			if s == "never" {
				g.hang = true
			} else if ms, err := strconv.Atoi(s); err == nil && ms > 0 {
				g.delay = time.Duration(ms) * time.Millisecond
			}
		}
	}
	return g
}

// refreshGuest shows the guest model's tools state on the VM (called before and after each request).
func refreshGuest(vm *simulator.VirtualMachine) {
	simulator.Map.WithLock(vm, func() {
		g := guestOf(vm)
		if !g.set {
			return
		}
		if vm.Guest == nil {
			vm.Guest = &types.GuestInfo{}
		}
		on := vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn
		if on && g.running {
			vm.Guest.ToolsRunningStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
			vm.Guest.ToolsStatus = types.VirtualMachineToolsStatusToolsOk
			vm.GuestHeartbeatStatus = types.ManagedEntityStatusGreen
		} else {
			vm.Guest.ToolsRunningStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsNotRunning)
			vm.Guest.ToolsStatus = types.VirtualMachineToolsStatusToolsNotRunning
			vm.GuestHeartbeatStatus = types.ManagedEntityStatusGray
		}
	})
}

const currentTime = `<?xml version="1.0" encoding="UTF-8"?>` +
	`<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>` +
	`<CurrentTime xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></CurrentTime>` +
	`</soapenv:Body></soapenv:Envelope>`

// shutdownGuest answers ShutdownGuest for a VM with a guest model; false leaves the request to vcsim.
func (h *cbtHandler) shutdownGuest(w http.ResponseWriter, r *http.Request, req *types.ShutdownGuest) bool {
	vm, ok := simulator.Map.Get(req.This).(*simulator.VirtualMachine)
	if !ok {
		return false
	}
	var g guestModel
	var on bool
	simulator.Map.WithLock(vm, func() {
		g = guestOf(vm)
		on = vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn
	})
	if !g.set || !on {
		return false // vcsim's own answers (InvalidPowerState when not powered on)
	}
	// The session: the same cookie on a call that needs one, answered by the simulator.
	check := r.Clone(r.Context())
	check.Body = io.NopCloser(bytes.NewReader([]byte(currentTime)))
	check.ContentLength = int64(len(currentTime))
	rec := httptest.NewRecorder()
	h.next.ServeHTTP(rec, check)
	if rec.Code != http.StatusOK {
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.Code)
		_, _ = w.Write(rec.Body.Bytes())
		return true
	}
	if !g.running {
		log.Printf("guest: ShutdownGuest %s -> ToolsUnavailable", vm.Self.Value)
		fault := simulator.Fault("Cannot complete operation because VMware Tools is not running in this virtual machine.",
			&types.ToolsUnavailable{})
		writeSOAP(w, http.StatusInternalServerError, soapFaultBody(fault))
		return true
	}
	if g.hang {
		log.Printf("guest: ShutdownGuest %s -> accepted; the guest never shuts down", vm.Self.Value)
	} else {
		log.Printf("guest: ShutdownGuest %s -> accepted; the guest powers off in %s", vm.Self.Value, g.delay)
		time.AfterFunc(g.delay, func() { guestPoweredOff(vm) })
	}
	writeSOAP(w, http.StatusOK, &soapResponse{name: "ShutdownGuestResponse", res: &types.ShutdownGuestResponse{}})
	return true
}

// guestPoweredOff: the guest OS finished shutting down and the VM powered off.
func guestPoweredOff(vm *simulator.VirtualMachine) {
	simulator.Map.WithLock(vm, func() {
		if vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
			return
		}
		off := types.VirtualMachinePowerStatePoweredOff
		vm.Summary.Runtime.PowerState = off
		simulator.Map.Update(vm, []types.PropertyChange{
			{Name: "runtime.powerState", Val: off},
			{Name: "summary.runtime.powerState", Val: off},
		})
		log.Printf("guest: %s shut down", vm.Self.Value)
	})
	refreshGuest(vm)
}
