// Changed block tracking (CBT) for the simulator: govmomi 0.24's vcsim has no QueryChangedDiskAreas.
//
// What a vSphere client sees, as on ESXi:
//
//   - ReconfigVM_Task with changeTrackingEnabled turns tracking on or off (vcsim already stores the flag).
//     Turning it off forgets every change ID of the VM's disks; turning it on again starts a new
//     tracking epoch (a new UUID), so IDs from before the reset are refused: that is a CBT reset.
//     A disk whose capacity or file changes is reset the same way.
//   - With tracking on, each disk's backing carries a changeId "XX XX .. XX-XX .. XX/N" (16 random bytes
//     per epoch, N a sequence number). N advances when the disk's bytes change. A snapshot freezes the
//     disk's state: the snapshot's own disk backing carries the changeId of that state.
//   - QueryChangedDiskAreas(snapshot, deviceKey, startOffset, changeId) answers, for the snapshot's state
//     (or the VM's current state when no snapshot is given and the VM is powered off), the areas changed
//     since changeId, or every allocated area for changeId "*". One answer covers at most -cbt-span
//     bytes from startOffset (the caller asks again from startOffset+length). Faults: InvalidArgument
//     "A specified parameter was not correct: changeId" for an ID of another epoch, of the future, or
//     malformed (what ESXi answers after a CBT reset); FileFault on the disk's -ctk.vmdk when tracking
//     is off; FileFault on the disk when no snapshot is given on a VM that is not powered off;
//     InvalidArgument deviceKey/startOffset; NotFound for a snapshot of another VM.
//
// How changes are found: the disks' bytes change outside the simulator (tests write the flat files on
// the local datastore directories; the datastore file interface PUTs them), so the tracker compares
// per-block digests (64 KiB blocks) of each tracked disk's flat file with those of its last scan. It
// scans before and after every SOAP request (skipping a file whose size and mtime are unchanged and
// old enough) and when a snapshot is taken; a block that differs is recorded as changed since every
// earlier change ID. Limit, stated: a block written and written back to its old content between two
// scans is not reported (ESXi would report it); "false positives" never occur here, ESXi allows them.
package main

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
	"github.com/vmware/govmomi/vim25/xml"
)

const cbtBlock = 64 * 1024

// cbtDisk is the tracking state of one disk of one VM.
type cbtDisk struct {
	epoch    string // the UUID part of the change IDs
	seq      int    // the current change ID's number
	capacity int64
	file     string        // local path of the disk's data
	sums     []uint64      // per block, at the last scan
	alloc    []bool        // per block, allocated at the last scan
	log      map[int][]int // id number -> blocks changed between the previous id and it
	pending  map[int]bool  // blocks changed since the current id
	size     int64         // the file's size and mtime at the last scan
	mtime    time.Time
	scanned  time.Time
}

func (d *cbtDisk) id() string { return fmt.Sprintf("%s/%d", d.epoch, d.seq) }

// cbtSnap is what a snapshot froze of one disk.
type cbtSnap struct {
	epoch string
	seq   int
	alloc []bool
}

type diskRef struct {
	vm  string
	key int32
}

type cbtTracker struct {
	mu    sync.Mutex
	seed  maphash.Seed
	span  int64
	disks map[diskRef]*cbtDisk
	snaps map[string]map[int32]cbtSnap // snapshot moref value -> device key -> frozen state
}

func newTracker(span int64) *cbtTracker {
	return &cbtTracker{
		seed:  maphash.MakeSeed(),
		span:  span,
		disks: map[diskRef]*cbtDisk{},
		snaps: map[string]map[int32]cbtSnap{},
	}
}

func newEpoch() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		log.Fatal(err)
	}
	parts := make([]string, 16)
	for i, c := range b {
		parts[i] = fmt.Sprintf("%02x", c)
	}
	return strings.Join(parts[:8], " ") + "-" + strings.Join(parts[8:], " ")
}

// -- the disks of a VM, read under the VM's lock ---------------------------------------------------------

type diskInfo struct {
	key      int32
	capacity int64
	file     string // local path of the data ("" if the datastore is unknown)
	name     string // datastore path of the descriptor, for faults
	backing  *types.VirtualDiskFlatVer2BackingInfo
}

func datastoreDir(name string) string {
	for _, obj := range simulator.Map.All("Datastore") {
		ds := obj.(*simulator.Datastore)
		if ds.Name == name {
			return ds.Info.GetDatastoreInfo().Url
		}
	}
	return ""
}

func disksOf(vm *simulator.VirtualMachine) []diskInfo {
	var out []diskInfo
	if vm.Config == nil {
		return nil
	}
	for _, dev := range vm.Config.Hardware.Device {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		capacity := disk.CapacityInBytes
		if capacity == 0 {
			capacity = disk.CapacityInKB * 1024
		}
		info := diskInfo{key: disk.Key, capacity: capacity, name: b.FileName, backing: b}
		var p dsPath
		if p.parse(b.FileName) {
			if dir := datastoreDir(p.ds); dir != "" {
				info.file = dataFile(filepath.Join(dir, p.path), capacity)
			}
		}
		out = append(out, info)
	}
	return out
}

type dsPath struct{ ds, path string }

func (o *dsPath) parse(s string) bool {
	if !strings.HasPrefix(s, "[") {
		return false
	}
	end := strings.Index(s, "]")
	if end < 0 {
		return false
	}
	o.ds, o.path = s[1:end], strings.TrimSpace(s[end+1:])
	return o.path != ""
}

// dataFile: "<disk>-flat.vmdk" beside the descriptor, or the descriptor itself when it holds the data.
func dataFile(descriptor string, capacity int64) string {
	if strings.HasSuffix(descriptor, ".vmdk") {
		flat := strings.TrimSuffix(descriptor, ".vmdk") + "-flat.vmdk"
		if _, err := os.Stat(flat); err == nil {
			return flat
		}
		if st, err := os.Stat(descriptor); err == nil && st.Size() == capacity {
			return descriptor
		}
		return flat // not written yet: reads as an empty disk
	}
	return descriptor
}

// -- scanning --------------------------------------------------------------------------------------------

// scan reads the file's blocks: a digest and whether it is allocated, per block (a missing or short
// file reads as holes).
func (t *cbtTracker) scan(file string, capacity int64) ([]uint64, []bool) {
	n := int((capacity + cbtBlock - 1) / cbtBlock)
	sums, alloc := make([]uint64, n), make([]bool, n)
	zero := t.sum(make([]byte, cbtBlock))
	for i := range sums {
		sums[i] = zero
	}
	f, err := os.Open(file)
	if err != nil {
		return sums, alloc
	}
	defer f.Close()
	buf := make([]byte, cbtBlock)
	for _, r := range dataRanges(f, capacity) {
		for b := r[0] / cbtBlock; b*cbtBlock < r[1] && int(b) < n; b++ {
			if alloc[b] {
				continue
			}
			k, _ := f.ReadAt(buf, b*cbtBlock)
			for i := k; i < len(buf); i++ {
				buf[i] = 0
			}
			sums[b], alloc[b] = t.sum(buf), true
		}
	}
	return sums, alloc
}

func (t *cbtTracker) sum(b []byte) uint64 {
	var h maphash.Hash
	h.SetSeed(t.seed)
	_, _ = h.Write(b)
	return h.Sum64()
}

// observe scans a disk and folds what changed into its pending set; a new id is issued when something
// changed since the current one. Called with t.mu held.
func (t *cbtTracker) observe(ref diskRef, info diskInfo, now time.Time) *cbtDisk {
	d := t.disks[ref]
	if d != nil && (d.capacity != info.capacity || d.file != info.file) {
		log.Printf("cbt: %s disk %d changed size or file: change tracking reset", ref.vm, ref.key)
		d = nil
	}
	st, err := os.Stat(info.file)
	var size int64
	var mtime time.Time
	if err == nil {
		size, mtime = st.Size(), st.ModTime()
	}
	if d == nil {
		sums, alloc := t.scan(info.file, info.capacity)
		d = &cbtDisk{
			epoch: newEpoch(), seq: 1, capacity: info.capacity, file: info.file, sums: sums, alloc: alloc,
			log: map[int][]int{}, pending: map[int]bool{}, size: size, mtime: mtime, scanned: now,
		}
		t.disks[ref] = d
		return d
	}
	// Unchanged size and mtime say nothing was written since the last scan, provided that mtime was
	// already in the past when that scan began (a write in the same clock tick keeps the mtime).
	if err == nil && size == d.size && mtime.Equal(d.mtime) && mtime.Before(d.scanned.Add(-50*time.Millisecond)) {
		return d
	}
	sums, alloc := t.scan(info.file, info.capacity)
	for i := range sums {
		if sums[i] != d.sums[i] || alloc[i] != d.alloc[i] {
			d.pending[i] = true
		}
	}
	d.sums, d.alloc, d.size, d.mtime, d.scanned = sums, alloc, size, mtime, now
	if len(d.pending) > 0 {
		blocks := make([]int, 0, len(d.pending))
		for b := range d.pending {
			blocks = append(blocks, b)
		}
		sort.Ints(blocks)
		d.seq++
		d.log[d.seq] = blocks
		d.pending = map[int]bool{}
	}
	return d
}

// refresh observes every tracked disk of every VM and shows the current change IDs on their backings.
func (t *cbtTracker) refresh() {
	for _, obj := range simulator.Map.All("VirtualMachine") {
		vm, ok := obj.(*simulator.VirtualMachine)
		if !ok {
			continue
		}
		t.refreshVM(vm)
		refreshGuest(vm)
	}
}

func (t *cbtTracker) refreshVM(vm *simulator.VirtualMachine) {
	var on bool
	var disks []diskInfo
	var self string
	simulator.Map.WithLock(vm, func() {
		if vm.Config == nil {
			return
		}
		self = vm.Self.Value
		on = vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
		disks = disksOf(vm)
		if vm.Capability.ChangeTrackingSupported == nil {
			vm.Capability.ChangeTrackingSupported = types.NewBool(true)
		}
	})
	ids := map[int32]string{}
	now := time.Now()
	t.mu.Lock()
	for _, info := range disks {
		ref := diskRef{self, info.key}
		if !on || info.file == "" {
			if t.disks[ref] != nil {
				log.Printf("cbt: %s disk %d: change tracking off, change IDs forgotten", self, info.key)
				delete(t.disks, ref)
			}
			continue
		}
		ids[info.key] = t.observe(ref, info, now).id()
	}
	t.mu.Unlock()
	simulator.Map.WithLock(vm, func() {
		for _, info := range disksOf(vm) {
			info.backing.ChangeId = ids[info.key] // "" when tracking is off, as on ESXi
		}
	})
}

// -- the registry hooks: snapshots freeze the disks' states ---------------------------------------------

func (t *cbtTracker) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "CbtTracker", Value: "cbt-tracker"}
}

// PutObject runs inside CreateSnapshot_Task, with the VM's lock held: the snapshot's disks get their
// own backings, carrying the change ID of the state the snapshot froze.
func (t *cbtTracker) PutObject(obj mo.Reference) {
	snap, ok := obj.(*simulator.VirtualMachineSnapshot)
	if !ok {
		return
	}
	vm, ok := simulator.Map.Get(snap.Vm).(*simulator.VirtualMachine)
	if !ok || vm.Config == nil {
		return
	}
	on := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	frozen := map[int32]cbtSnap{}
	devices := make([]types.BaseVirtualDevice, len(snap.Config.Hardware.Device))
	copy(devices, snap.Config.Hardware.Device)
	now := time.Now()
	t.mu.Lock()
	for _, info := range disksOf(vm) {
		id := ""
		if on && info.file != "" {
			d := t.observe(diskRef{vm.Self.Value, info.key}, info, now)
			frozen[info.key] = cbtSnap{epoch: d.epoch, seq: d.seq, alloc: append([]bool(nil), d.alloc...)}
			id = d.id()
			info.backing.ChangeId = id
		}
		for i, dev := range devices {
			if disk, ok := dev.(*types.VirtualDisk); ok && disk.Key == info.key {
				copyDisk := *disk
				b := *info.backing
				b.ChangeId = id
				copyDisk.Backing = &b
				devices[i] = &copyDisk
			}
		}
	}
	t.snaps[snap.Self.Value] = frozen
	t.mu.Unlock()
	snap.Config.Hardware.Device = devices
}

func (t *cbtTracker) UpdateObject(mo.Reference, []types.PropertyChange) {}

func (t *cbtTracker) RemoveObject(ref types.ManagedObjectReference) {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch ref.Type {
	case "VirtualMachineSnapshot":
		delete(t.snaps, ref.Value)
	case "VirtualMachine":
		for k := range t.disks {
			if k.vm == ref.Value {
				delete(t.disks, k)
			}
		}
	}
}

// -- QueryChangedDiskAreas ------------------------------------------------------------------------------

func invalidArgument(prop string) *soap.Fault {
	return simulator.Fault("A specified parameter was not correct: "+prop, &types.InvalidArgument{InvalidProperty: prop})
}

func fileFault(file string) *soap.Fault {
	return simulator.Fault("Error caused by file "+file, &types.FileFault{File: file})
}

// parseChangeID splits "EPOCH/N".
func parseChangeID(s string) (string, int, bool) {
	i := strings.LastIndex(s, "/")
	if i < 0 {
		return "", 0, false
	}
	n, err := strconv.Atoi(s[i+1:])
	if err != nil || n < 1 {
		return "", 0, false
	}
	return s[:i], n, true
}

// query answers one QueryChangedDiskAreas call; the VM and the session were checked by the simulator.
func (t *cbtTracker) query(req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, *soap.Fault, string) {
	vm, ok := simulator.Map.Get(req.This).(*simulator.VirtualMachine)
	if !ok {
		return nil, simulator.Fault("", &types.ManagedObjectNotFound{Obj: req.This}), "no such VM"
	}
	t.refreshVM(vm)
	var on, poweredOff bool
	var info *diskInfo
	var snapVM types.ManagedObjectReference
	simulator.Map.WithLock(vm, func() {
		on = vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
		poweredOff = vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOff
		for _, d := range disksOf(vm) {
			if d.key == req.DeviceKey {
				d := d
				info = &d
			}
		}
	})
	if req.Snapshot != nil {
		snap, ok := simulator.Map.Get(*req.Snapshot).(*simulator.VirtualMachineSnapshot)
		if ok {
			snapVM = snap.Vm
		}
		if !ok || snapVM != vm.Self {
			return nil, simulator.Fault("The object or item referred to could not be found.", &types.NotFound{}), "snapshot not found"
		}
	}
	if info == nil {
		return nil, invalidArgument("deviceKey"), "no such disk"
	}
	if !on || info.file == "" {
		return nil, fileFault(strings.TrimSuffix(info.name, ".vmdk") + "-ctk.vmdk"), "change tracking is off"
	}
	if req.Snapshot == nil && !poweredOff {
		return nil, fileFault(info.name), "no snapshot on a VM that is not powered off"
	}
	if req.StartOffset < 0 || req.StartOffset >= info.capacity {
		return nil, invalidArgument("startOffset"), "startOffset outside the disk"
	}

	t.mu.Lock()
	defer t.mu.Unlock()
	d := t.disks[diskRef{vm.Self.Value, req.DeviceKey}]
	if d == nil {
		return nil, fileFault(strings.TrimSuffix(info.name, ".vmdk") + "-ctk.vmdk"), "no tracking state"
	}
	state := cbtSnap{epoch: d.epoch, seq: d.seq, alloc: d.alloc}
	if req.Snapshot != nil {
		s, ok := t.snaps[req.Snapshot.Value][req.DeviceKey]
		if !ok || s.epoch != d.epoch {
			return nil, fileFault(strings.TrimSuffix(info.name, ".vmdk") + "-ctk.vmdk"), "the snapshot predates the tracking epoch"
		}
		state = s
	}
	changed := make([]bool, len(state.alloc))
	if req.ChangeId == "*" {
		copy(changed, state.alloc)
	} else {
		epoch, seq, ok := parseChangeID(req.ChangeId)
		if !ok || epoch != state.epoch || seq > state.seq {
			return nil, invalidArgument("changeId"), "unknown change ID (another epoch, the future, or malformed)"
		}
		for n := seq + 1; n <= state.seq; n++ {
			for _, b := range d.log[n] {
				if b < len(changed) {
					changed[b] = true
				}
			}
		}
	}
	end := info.capacity
	if t.span > 0 && req.StartOffset+t.span < end {
		end = req.StartOffset + t.span
	}
	out := &types.DiskChangeInfo{StartOffset: req.StartOffset, Length: end - req.StartOffset}
	for b := req.StartOffset / cbtBlock; b*cbtBlock < end; b++ {
		if !changed[b] {
			continue
		}
		start, stop := b*cbtBlock, (b+1)*cbtBlock
		if start < req.StartOffset {
			start = req.StartOffset
		}
		if stop > end {
			stop = end
		}
		n := len(out.ChangedArea)
		if n > 0 && out.ChangedArea[n-1].Start+out.ChangedArea[n-1].Length == start {
			out.ChangedArea[n-1].Length += stop - start
		} else {
			out.ChangedArea = append(out.ChangedArea, types.DiskChangeExtent{Start: start, Length: stop - start})
		}
	}
	return out, nil, ""
}

// -- the HTTP wrapper: refresh around every SOAP request, answer QueryChangedDiskAreas ------------------

type cbtHandler struct {
	t    *cbtTracker
	next http.Handler
}

func (h *cbtHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || !strings.HasPrefix(r.URL.Path, "/sdk") {
		h.next.ServeHTTP(w, r)
		return
	}
	body, err := io.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	h.t.refresh()
	if bytes.Contains(body, []byte("ShutdownGuest")) {
		if method, err := simulator.UnmarshalBody(types.TypeFunc(), body); err == nil {
			if req, ok := method.Body.(*types.ShutdownGuest); ok && h.shutdownGuest(w, r, req) {
				h.t.refresh()
				return
			}
		}
	}
	if !bytes.Contains(body, []byte("QueryChangedDiskAreas")) {
		h.next.ServeHTTP(w, r)
		h.t.refresh()
		return
	}
	method, err := simulator.UnmarshalBody(types.TypeFunc(), body)
	req, ok := (*types.QueryChangedDiskAreas)(nil), false
	if err == nil {
		req, ok = method.Body.(*types.QueryChangedDiskAreas)
	}
	if !ok {
		h.next.ServeHTTP(w, r)
		return
	}
	// The simulator checks the session and the VM: it answers MethodNotFound when both are fine (and
	// logs "does not implement: QueryChangedDiskAreas", which the "cbt:" line after it answers).
	rec := httptest.NewRecorder()
	h.next.ServeHTTP(rec, r)
	if !bytes.Contains(rec.Body.Bytes(), []byte("MethodNotFound")) {
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.Code)
		_, _ = w.Write(rec.Body.Bytes())
		return
	}
	info, fault, why := h.t.query(req)
	snap := "-"
	if req.Snapshot != nil {
		snap = req.Snapshot.Value
	}
	if fault != nil {
		log.Printf("cbt: QueryChangedDiskAreas vm=%s snapshot=%s device=%d start=%d changeId=%q -> fault %s (%s)",
			req.This.Value, snap, req.DeviceKey, req.StartOffset, req.ChangeId, fault.String, why)
		writeSOAP(w, http.StatusInternalServerError, soapFaultBody(fault))
		return
	}
	var total int64
	for _, a := range info.ChangedArea {
		total += a.Length
	}
	log.Printf("cbt: QueryChangedDiskAreas vm=%s snapshot=%s device=%d start=%d changeId=%q -> %d areas, %d bytes, of [%d, %d)",
		req.This.Value, snap, req.DeviceKey, req.StartOffset, req.ChangeId, len(info.ChangedArea), total,
		info.StartOffset, info.StartOffset+info.Length)
	res := &types.QueryChangedDiskAreasResponse{Returnval: *info}
	writeSOAP(w, http.StatusOK, &soapResponse{name: "QueryChangedDiskAreasResponse", res: res})
}

// The SOAP encoding below copies the simulator's own (its types are not exported).

type soapEnvelope struct {
	XMLName xml.Name    `xml:"soapenv:Envelope"`
	Enc     string      `xml:"xmlns:soapenc,attr"`
	Env     string      `xml:"xmlns:soapenv,attr"`
	XSD     string      `xml:"xmlns:xsd,attr"`
	XSI     string      `xml:"xmlns:xsi,attr"`
	Body    interface{} `xml:"soapenv:Body"`
}

type faultDetail struct{ Fault types.AnyType }

func (d *faultDetail) MarshalXML(e *xml.Encoder, start xml.StartElement) error {
	kind := fmt.Sprintf("%T", d.Fault)
	kind = kind[strings.LastIndex(kind, ".")+1:]
	start.Name.Local = kind + "Fault"
	start.Attr = append(start.Attr,
		xml.Attr{Name: xml.Name{Local: "xmlns"}, Value: "urn:vim25"},
		xml.Attr{Name: xml.Name{Local: "xsi:type"}, Value: kind})
	return e.EncodeElement(d.Fault, start)
}

type soapFault struct {
	XMLName xml.Name `xml:"soapenv:Fault"`
	Code    string   `xml:"faultcode"`
	String  string   `xml:"faultstring"`
	Detail  struct {
		Fault *faultDetail
	} `xml:"detail"`
}

func soapFaultBody(f *soap.Fault) interface{} {
	out := &soapFault{Code: f.Code, String: f.String}
	out.Detail.Fault = &faultDetail{f.Detail.Fault}
	return struct{ Fault *soapFault }{out}
}

// soapResponse is a SOAP body holding one method's response (e.g. name "QueryChangedDiskAreasResponse").
type soapResponse struct {
	name string
	res  interface{}
}

func (r *soapResponse) MarshalXML(e *xml.Encoder, start xml.StartElement) error {
	res := xml.StartElement{Name: xml.Name{Space: "urn:vim25", Local: r.name}}
	if err := e.EncodeToken(start); err != nil {
		return err
	}
	if err := e.EncodeElement(r.res, res); err != nil {
		return err
	}
	return e.EncodeToken(start.End())
}

func writeSOAP(w http.ResponseWriter, status int, body interface{}) {
	var out bytes.Buffer
	fmt.Fprint(&out, xml.Header)
	e := xml.NewEncoder(&out)
	err := e.Encode(&soapEnvelope{
		Enc:  "http://schemas.xmlsoap.org/soap/encoding/",
		Env:  "http://schemas.xmlsoap.org/soap/envelope/",
		XSD:  "http://www.w3.org/2001/XMLSchema",
		XSI:  "http://www.w3.org/2001/XMLSchema-instance",
		Body: body,
	})
	if err == nil {
		err = e.Flush()
	}
	if err != nil {
		log.Printf("cbt: cannot encode the answer: %v", err)
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(out.Bytes())
}

// dataRanges lists the [start, end) ranges of the file holding data (SEEK_DATA/SEEK_HOLE), within
// capacity; the whole file when the filesystem cannot tell.
func dataRanges(f *os.File, capacity int64) [][2]int64 {
	const seekData, seekHole = 3, 4
	st, err := f.Stat()
	if err != nil {
		return nil
	}
	size := st.Size()
	if size > capacity {
		size = capacity
	}
	var out [][2]int64
	for off := int64(0); off < size; {
		start, err := f.Seek(off, seekData)
		if err != nil {
			if len(out) == 0 && off == 0 && !isNoData(err) {
				return [][2]int64{{0, size}}
			}
			break
		}
		end, err := f.Seek(start, seekHole)
		if err != nil || end > size {
			end = size
		}
		if start >= size {
			break
		}
		out = append(out, [2]int64{start, end})
		off = end
	}
	return out
}

func isNoData(err error) bool {
	return errors.Is(err, syscall.ENXIO) // no data past the offset
}
