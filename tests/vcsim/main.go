// Command vcsim starts govmomi's vCenter simulator (simulator.VPX) for the portal's vSphere tests.
//
// It listens on 127.0.0.1 (a free port unless -listen says otherwise) with a fresh self-signed
// certificate made for this run, then prints, one item per line:
//
//	https://USER:PASSWORD@127.0.0.1:PORT/sdk
//	thumbprint AA:BB:...            (SHA-256 of the server certificate)
//	datastore NAME LOCAL-DIRECTORY  (one line per datastore; its files live there)
//	ready
//
// and serves until SIGTERM/SIGINT, when it removes the datastore directories and exits.
// It adds changed block tracking (QueryChangedDiskAreas), which govmomi's simulator lacks (cbt.go), and
// guest tools for VMs that ask for them in their extraConfig (guest.go).
// Its log (stderr) has one "cbt: QueryChangedDiskAreas ..." line per call of that method.
// Datastore directories are made under $TMPDIR.
//
// Built in GOPATH mode against Debian's golang-github-vmware-govmomi-dev (govmomi 0.24):
// see tests/vcsim_build.sh.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"flag"
	"fmt"
	"log"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
)

func selfSigned() (tls.Certificate, string, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return tls.Certificate{}, "", err
	}
	tmpl := x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "vcsim.test", Organization: []string{"dr-portal tests"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(7 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, &tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	sum := sha256.Sum256(der)
	hexed := strings.ToUpper(hex.EncodeToString(sum[:]))
	pairs := make([]string, 0, len(sum))
	for i := 0; i < len(hexed); i += 2 {
		pairs = append(pairs, hexed[i:i+2])
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, strings.Join(pairs, ":"), nil
}

func randomPassword() string {
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		log.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// parseDelays reads "Method:ms,Method:ms" into vcsim's per-method delay table.
func parseDelays(s string) (map[string]int, error) {
	out := map[string]int{}
	if s == "" {
		return out, nil
	}
	for _, item := range strings.Split(s, ",") {
		parts := strings.SplitN(item, ":", 2)
		if len(parts) != 2 {
			return nil, fmt.Errorf("bad -method-delay item %q (want Method:milliseconds)", item)
		}
		ms, err := strconv.Atoi(parts[1])
		if err != nil || ms < 0 {
			return nil, fmt.Errorf("bad -method-delay milliseconds in %q", item)
		}
		out[parts[0]] = ms
	}
	return out, nil
}

func main() {
	log.SetFlags(0)
	log.SetPrefix("vcsim: ")
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (port 0 = a free port)")
	user := flag.String("username", "administrator@vsphere.local", "login user name")
	pass := flag.String("password", "", "login password (random when empty)")
	dc := flag.Int("dc", 1, "datacenters")
	hosts := flag.Int("standalone-host", 1, "standalone hosts per datacenter")
	clusters := flag.Int("cluster", 1, "clusters per datacenter")
	clusterHosts := flag.Int("host", 3, "hosts per cluster")
	vms := flag.Int("vm", 2, "VMs per standalone host and per cluster resource pool")
	datastores := flag.Int("ds", 1, "local datastores per datacenter (shared by its hosts)")
	portgroups := flag.Int("pg", 1, "distributed port groups per datacenter")
	pools := flag.Int("pool", 0, "child resource pools per cluster")
	folders := flag.Int("folder", 0, "folders (see govmomi simulator.Model.Folder)")
	autostart := flag.Bool("autostart", true, "power on the model's VMs")
	delays := flag.String("method-delay", "", "per-method delays, e.g. PowerOnVM_Task:3000,RetrievePropertiesEx:100")
	cbtSpan := flag.Int64("cbt-span", 16<<20, "bytes of a disk one QueryChangedDiskAreas answer covers at most (0: all)")
	flag.Parse()

	if *pass == "" {
		*pass = randomPassword()
	}
	methodDelay, err := parseDelays(*delays)
	if err != nil {
		log.Fatal(err)
	}

	m := simulator.VPX()
	m.Datacenter = *dc
	m.Host = *hosts
	m.Cluster = *clusters
	m.ClusterHost = *clusterHosts
	m.Machine = *vms
	m.Datastore = *datastores
	m.Portgroup = *portgroups
	m.Pool = *pools
	m.Folder = *folders
	m.Autostart = *autostart
	m.DelayConfig.MethodDelay = methodDelay

	if err := m.Create(); err != nil {
		log.Fatalf("cannot create the model: %v", err)
	}

	cert, thumbprint, err := selfSigned()
	if err != nil {
		log.Fatalf("cannot make a certificate: %v", err)
	}
	m.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	m.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *pass)}
	m.Service.RegisterEndpoints = true

	tracker := newTracker(*cbtSpan)
	simulator.Map.AddHandler(tracker)

	s := m.Service.NewServer()
	// Before any request arrives: change tracking sees every SOAP request (see cbt.go).
	s.Config.Handler = &cbtHandler{t: tracker, next: s.Config.Handler}

	var lines []string
	for _, obj := range simulator.Map.All("Datastore") {
		ds := obj.(*simulator.Datastore)
		lines = append(lines, fmt.Sprintf("datastore %s %s", ds.Name, ds.Info.GetDatastoreInfo().Url))
	}
	sort.Strings(lines)

	fmt.Println(s.URL.String())
	fmt.Println("thumbprint " + thumbprint)
	for _, line := range lines {
		fmt.Println(line)
	}
	fmt.Println("ready")
	_ = os.Stdout.Sync()

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	// No s.Close(): it would wait for requests still running (delayed ones, for instance).
	m.Remove()
	os.Exit(0)
}
