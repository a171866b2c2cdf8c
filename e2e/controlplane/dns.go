package main

import (
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/clientcmd"
)

// clusterDNSMain is `parley-controlplane cluster-dns`: the cluster DNS of the
// test node (what CoreDNS is in kind or k3d), so that pods find Services by
// name. It answers A queries for SERVICE.NAMESPACE.svc.DOMAIN (and, through
// the pods' search path, SERVICE and SERVICE.NAMESPACE): a Service's ClusterIP,
// or the ready endpoints of a headless Service. Every other name gets
// NXDOMAIN: nothing is forwarded, so no query leaves the machine.
func clusterDNSMain(args []string) int {
	fs := flag.NewFlagSet("cluster-dns", flag.ContinueOnError)
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig of the cluster (required)")
	listen := fs.String("listen", "", "address:port to serve on, UDP and TCP (required)")
	domain := fs.String("domain", "cluster.local", "the cluster domain")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *kubeconfig == "" || *listen == "" {
		fmt.Fprintln(os.Stderr, "cluster-dns: --kubeconfig and --listen are required")
		return 2
	}
	if err := serveClusterDNS(*kubeconfig, *listen, strings.Trim(strings.ToLower(*domain), ".")); err != nil {
		fmt.Fprintf(os.Stderr, "cluster-dns: %v\n", err)
		return 1
	}
	return 0
}

type clusterDNS struct {
	suffix    string // ".svc.cluster.local."
	services  corelisters.ServiceLister
	endpoints discoverylisters.EndpointSliceLister
}

func serveClusterDNS(kubeconfig, listen, domain string) error {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	cfg.UserAgent = "parley-cluster-dns"
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	factory := informers.NewSharedInformerFactory(client, 10*time.Minute)
	d := &clusterDNS{
		suffix:    ".svc." + domain + ".",
		services:  factory.Core().V1().Services().Lister(),
		endpoints: factory.Discovery().V1().EndpointSlices().Lister(),
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	for typ, ok := range factory.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("no %v from the API server", typ)
		}
	}

	udp, err := net.ListenPacket("udp", listen)
	if err != nil {
		return err
	}
	defer udp.Close()
	tcp, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	defer tcp.Close()
	go func() {
		<-ctx.Done()
		udp.Close()
		tcp.Close()
	}()
	go d.serveTCP(tcp)
	fmt.Fprintf(os.Stderr, "cluster-dns: serving *%s on %s\n", d.suffix, listen)
	buf := make([]byte, 4096)
	for {
		n, addr, err := udp.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		if resp := d.answer(buf[:n]); resp != nil {
			_, _ = udp.WriteTo(resp, addr)
		}
	}
}

func (d *clusterDNS) serveTCP(ln net.Listener) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer conn.Close()
			for {
				_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
				var size [2]byte
				if _, err := io.ReadFull(conn, size[:]); err != nil {
					return
				}
				msg := make([]byte, binary.BigEndian.Uint16(size[:]))
				if _, err := io.ReadFull(conn, msg); err != nil {
					return
				}
				resp := d.answer(msg)
				if resp == nil {
					return
				}
				out := binary.BigEndian.AppendUint16(nil, uint16(len(resp)))
				if _, err := conn.Write(append(out, resp...)); err != nil {
					return
				}
			}
		}()
	}
}

// answer builds the response to one query message; nil for garbage.
func (d *clusterDNS) answer(msg []byte) []byte {
	var p dnsmessage.Parser
	header, err := p.Start(msg)
	if err != nil || header.Response {
		return nil
	}
	q, err := p.Question()
	resp := dnsmessage.Header{ID: header.ID, Response: true, OpCode: header.OpCode, RecursionDesired: header.RecursionDesired}
	if err != nil {
		resp.RCode = dnsmessage.RCodeFormatError
		b := dnsmessage.NewBuilder(nil, resp)
		out, _ := b.Finish()
		return out
	}
	ips, found := d.lookup(strings.ToLower(q.Name.String()))
	resp.Authoritative = found
	if !found {
		resp.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, resp)
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil
	}
	if err := b.Question(q); err != nil {
		return nil
	}
	if err := b.StartAnswers(); err != nil {
		return nil
	}
	if q.Class == dnsmessage.ClassINET && (q.Type == dnsmessage.TypeA || q.Type == dnsmessage.TypeALL) {
		for _, ip := range ips {
			var a dnsmessage.AResource
			copy(a.A[:], ip.To4())
			hdr := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 5}
			if err := b.AResource(hdr, a); err != nil {
				return nil
			}
		}
	}
	out, err := b.Finish()
	if err != nil {
		return nil
	}
	return out
}

// lookup resolves "service.namespace.svc.DOMAIN."; found is false for names
// that do not exist (NXDOMAIN), true with no addresses for a name that exists
// without IPv4 addresses.
func (d *clusterDNS) lookup(name string) (ips []net.IP, found bool) {
	rest, ok := strings.CutSuffix(name, d.suffix)
	if !ok {
		return nil, false
	}
	service, namespace, ok := strings.Cut(rest, ".")
	if !ok || strings.Contains(namespace, ".") {
		return nil, false
	}
	svc, err := d.services.Services(namespace).Get(service)
	if err != nil {
		return nil, false
	}
	if svc.Spec.Type == v1.ServiceTypeExternalName {
		return nil, true // a CNAME to a name outside the cluster: not served here
	}
	if svc.Spec.ClusterIP != v1.ClusterIPNone {
		for _, s := range svc.Spec.ClusterIPs {
			if ip := net.ParseIP(s); ip != nil && ip.To4() != nil {
				ips = append(ips, ip)
			}
		}
		return ips, true
	}
	// Headless: the ready endpoints.
	slices, err := d.endpoints.EndpointSlices(namespace).List(labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: service}))
	if err != nil {
		return nil, true
	}
	for _, slice := range slices {
		if slice.AddressType != discoveryv1.AddressTypeIPv4 {
			continue
		}
		for _, ep := range slice.Endpoints {
			if ep.Conditions.Ready != nil && !*ep.Conditions.Ready {
				continue
			}
			for _, a := range ep.Addresses {
				if ip := net.ParseIP(a); ip != nil {
					ips = append(ips, ip)
				}
			}
		}
	}
	return ips, true
}
