package main

import (
	"errors"
	"fmt"
	"math/big"
	"net"
	"path/filepath"
	"strconv"
	"sync"
)

// With --node-ip the control plane serves a real node (scripts/cluster.sh):
// the kubelet, kube-proxy, kube-scheduler and kube-controller-manager run as
// subcommands of this binary (components.go), each in a process of its own.

func checkNodeFlags(c *config) error {
	_, cidr, err := net.ParseCIDR(c.serviceCIDR)
	if err != nil || cidr.IP.To4() == nil {
		return fmt.Errorf("--service-cidr %q: want an IPv4 range such as 10.96.0.0/24", c.serviceCIDR)
	}
	if c.nodeIP == "" {
		return nil
	}
	ip := net.ParseIP(c.nodeIP)
	if ip == nil || ip.To4() == nil || ip.IsLoopback() || ip.IsUnspecified() {
		return fmt.Errorf("--node-ip %q: want a non-loopback IPv4 address of this machine", c.nodeIP)
	}
	if c.nodeName == "" {
		return errors.New("--node-name must not be empty")
	}
	return nil
}

// firstServiceIP is the first address of the Service range: the ClusterIP
// of the `kubernetes` Service.
func firstServiceIP(serviceCIDR string) net.IP {
	_, cidr, err := net.ParseCIDR(serviceCIDR)
	if err != nil {
		return nil
	}
	n := new(big.Int).SetBytes(cidr.IP.To4())
	n.Add(n, big.NewInt(1))
	b := n.Bytes()
	ip := make(net.IP, 4)
	copy(ip[4-len(b):], b)
	return ip
}

func pkiOptionsFor(c *config) pkiOptions {
	o := pkiOptions{serviceIP: firstServiceIP(c.serviceCIDR), nodeName: c.nodeName}
	if c.nodeIP != "" {
		o.nodeIP = net.ParseIP(c.nodeIP)
	}
	return o
}

// nodeAPIServerArgs are the kube-apiserver flags with a node: as a
// kubeadm-made API server would have them, on loopback and the node's address.
func nodeAPIServerArgs(c *config, p pkiFiles, etcdURL string, port int) []string {
	return []string{
		"--etcd-servers=" + etcdURL,
		// The `kubernetes` Service's endpoint (published by the lease endpoint
		// reconciler): pods reach the API server at the node's address.
		"--advertise-address=" + c.nodeIP,
		"--bind-address=127.0.0.1", // the listener is on loopback and the node's address (listenAlsoOn)
		"--secure-port=" + strconv.Itoa(port),
		"--tls-cert-file=" + p.servingCert,
		"--tls-private-key-file=" + p.servingKey,
		"--client-ca-file=" + p.caCert,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + p.saKey,
		"--service-account-signing-key-file=" + p.saKey,
		"--service-cluster-ip-range=" + c.serviceCIDR,
		"--authorization-mode=Node,RBAC",
		// ServiceAccount is on by default; NodeRestriction limits the kubelet
		// to its own node and pods.
		"--enable-admission-plugins=NodeRestriction",
		"--allow-privileged=true",
		// logs, exec, port-forward: the API server calls the kubelet at the
		// node's InternalIP and checks its serving certificate.
		"--kubelet-client-certificate=" + p.kubeletClientCert,
		"--kubelet-client-key=" + p.kubeletClientKey,
		"--kubelet-certificate-authority=" + p.caCert,
		"--kubelet-preferred-address-types=InternalIP",
		"--profiling=false",
		"--v=" + strconv.Itoa(c.verbosity),
	}
}

// writeNodeKubeconfigs writes the kubeconfigs of the kubelet
// (DIR/kubelet.kubeconfig, user system:node:NAME), of kube-proxy
// (DIR/kube-proxy.kubeconfig, user system:kube-proxy), and of
// kube-scheduler and kube-controller-manager (DIR/kubeconfig: the admin).
func writeNodeKubeconfigs(c *config, server string, p pkiFiles) error {
	if err := writeKubeconfig(filepath.Join(c.dataDir, "kubelet.kubeconfig"), server, p.caCert,
		"system:node:"+c.nodeName, p.nodeCert, p.nodeKey); err != nil {
		return err
	}
	return writeKubeconfig(filepath.Join(c.dataDir, "kube-proxy.kubeconfig"), server, p.caCert,
		"system:kube-proxy", p.proxyCert, p.proxyKey)
}

// listenAlsoOn returns a listener that accepts on ln and on a new listener
// at addr; Addr() is ln's.
func listenAlsoOn(ln net.Listener, addr string) (net.Listener, error) {
	second, err := net.Listen("tcp", addr)
	if err != nil {
		ln.Close()
		return nil, err
	}
	m := &multiListener{first: ln, all: []net.Listener{ln, second}, conns: make(chan acceptResult), done: make(chan struct{})}
	for _, l := range m.all {
		go m.accept(l)
	}
	return m, nil
}

type acceptResult struct {
	conn net.Conn
	err  error
}

type multiListener struct {
	first     net.Listener
	all       []net.Listener
	conns     chan acceptResult
	done      chan struct{}
	closeOnce sync.Once
}

func (m *multiListener) accept(l net.Listener) {
	for {
		conn, err := l.Accept()
		select {
		case m.conns <- acceptResult{conn, err}:
		case <-m.done:
			if conn != nil {
				conn.Close()
			}
			return
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return
		}
	}
}

func (m *multiListener) Accept() (net.Conn, error) {
	select {
	case r := <-m.conns:
		return r.conn, r.err
	case <-m.done:
		return nil, net.ErrClosed
	}
}

func (m *multiListener) Close() error {
	var err error
	m.closeOnce.Do(func() {
		close(m.done)
		for _, l := range m.all {
			if e := l.Close(); e != nil && err == nil {
				err = e
			}
		}
	})
	return err
}

func (m *multiListener) Addr() net.Addr { return m.first.Addr() }
