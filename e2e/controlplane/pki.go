package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// adminUser is the kubeconfig's user; its certificate carries the group
// system:masters, which RBAC lets do anything.
const adminUser = "parley-admin"

type pkiFiles struct {
	dir                     string
	caCert, caKey           string
	servingCert, servingKey string
	adminCert, adminKey     string
	saKey                   string
	// With a node (--node-ip): the API server's client certificate for the
	// kubelet, the kubelet's client certificate (system:node:NAME) and serving
	// certificate, and kube-proxy's client certificate (system:kube-proxy).
	kubeletClientCert, kubeletClientKey   string
	nodeCert, nodeKey                     string
	kubeletServingCert, kubeletServingKey string
	proxyCert, proxyKey                   string
}

// pkiOptions says what the certificates must cover.
type pkiOptions struct {
	serviceIP net.IP // the `kubernetes` Service's ClusterIP
	nodeIP    net.IP // nil without a node
	nodeName  string
}

func pkiPaths(dir string) pkiFiles {
	j := func(name string) string { return filepath.Join(dir, name) }
	return pkiFiles{
		dir:                dir,
		caCert:             j("ca.crt"),
		caKey:              j("ca.key"),
		servingCert:        j("apiserver.crt"),
		servingKey:         j("apiserver.key"),
		adminCert:          j("admin.crt"),
		adminKey:           j("admin.key"),
		saKey:              j("sa.key"),
		kubeletClientCert:  j("apiserver-kubelet-client.crt"),
		kubeletClientKey:   j("apiserver-kubelet-client.key"),
		nodeCert:           j("node.crt"),
		nodeKey:            j("node.key"),
		kubeletServingCert: j("kubelet.crt"),
		kubeletServingKey:  j("kubelet.key"),
		proxyCert:          j("kube-proxy.crt"),
		proxyKey:           j("kube-proxy.key"),
	}
}

// reusable tells whether the certificates of an earlier run cover o.
func (p pkiFiles) reusable(o pkiOptions) bool {
	if _, err := os.Stat(p.saKey); err != nil {
		return false
	}
	if _, err := tls.LoadX509KeyPair(p.adminCert, p.adminKey); err != nil {
		return false
	}
	serving, err := tls.LoadX509KeyPair(p.servingCert, p.servingKey)
	if err != nil || len(serving.Certificate) == 0 {
		return false
	}
	cert, err := x509.ParseCertificate(serving.Certificate[0])
	if err != nil {
		return false
	}
	for _, ip := range []net.IP{o.serviceIP, o.nodeIP} {
		if ip != nil && cert.VerifyHostname(ip.String()) != nil {
			return false
		}
	}
	if o.nodeIP != nil {
		for _, pair := range [][2]string{{p.kubeletClientCert, p.kubeletClientKey}, {p.nodeCert, p.nodeKey},
			{p.kubeletServingCert, p.kubeletServingKey}, {p.proxyCert, p.proxyKey}} {
			if _, err := tls.LoadX509KeyPair(pair[0], pair[1]); err != nil {
				return false
			}
		}
	}
	return true
}

// ensurePKI creates the certificates and keys once; a restart on the same
// data directory reuses them (unless they do not cover o).
func ensurePKI(dir string, o pkiOptions) (pkiFiles, error) {
	p := pkiPaths(dir)
	if p.reusable(o) {
		return p, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return p, err
	}
	now := time.Now().Add(-time.Hour)
	notAfter := now.Add(10 * 365 * 24 * time.Hour)

	caKey, err := newKey()
	if err != nil {
		return p, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "parley-controlplane-ca"},
		NotBefore:             now,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return p, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return p, err
	}

	type file struct {
		path string
		data []byte
	}
	files := []file{{p.caCert, pemCert(caDER)}, {p.caKey, pemKey(caKey)}}
	// issue signs a certificate for a new key and queues both for writing.
	issue := func(certPath, keyPath string, tmpl *x509.Certificate) error {
		key, err := newKey()
		if err != nil {
			return err
		}
		tmpl.SerialNumber = serial()
		tmpl.NotBefore = now
		tmpl.NotAfter = notAfter
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
		if err != nil {
			return err
		}
		files = append(files, file{certPath, pemCert(der)}, file{keyPath, pemKey(key)})
		return nil
	}
	client := func(cn string, orgs ...string) *x509.Certificate {
		return &x509.Certificate{
			Subject:     pkix.Name{CommonName: cn, Organization: orgs},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}
	}

	servingIPs := []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1"), o.serviceIP}
	if o.nodeIP != nil {
		servingIPs = append(servingIPs, o.nodeIP)
	}
	if err := issue(p.servingCert, p.servingKey, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local"},
		IPAddresses: servingIPs,
	}); err != nil {
		return p, err
	}
	if err := issue(p.adminCert, p.adminKey, client(adminUser, "system:masters")); err != nil {
		return p, err
	}
	if o.nodeIP != nil {
		if err := issue(p.kubeletClientCert, p.kubeletClientKey,
			client("kube-apiserver-kubelet-client", "system:masters")); err != nil {
			return p, err
		}
		if err := issue(p.nodeCert, p.nodeKey, client("system:node:"+o.nodeName, "system:nodes")); err != nil {
			return p, err
		}
		if err := issue(p.kubeletServingCert, p.kubeletServingKey, &x509.Certificate{
			Subject:     pkix.Name{CommonName: o.nodeName},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			DNSNames:    []string{o.nodeName, "localhost"},
			IPAddresses: []net.IP{o.nodeIP, net.ParseIP("127.0.0.1")},
		}); err != nil {
			return p, err
		}
		if err := issue(p.proxyCert, p.proxyKey, client("system:kube-proxy")); err != nil {
			return p, err
		}
	}

	saKey, err := newKey()
	if err != nil {
		return p, err
	}
	files = append(files, file{p.saKey, pemKey(saKey)})

	for _, w := range files {
		if w.data == nil {
			return p, errors.New("encoding a key failed")
		}
		if err := os.WriteFile(w.path, w.data, 0o600); err != nil {
			return p, err
		}
	}
	return p, nil
}

func newKey() (*ecdsa.PrivateKey, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return big.NewInt(time.Now().UnixNano())
	}
	return n
}

func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func pemKey(k crypto.Signer) []byte {
	ec, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil
	}
	der, err := x509.MarshalECPrivateKey(ec)
	if err != nil {
		return nil
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
}

// writeKubeconfig writes a kubeconfig for user, with the certificate and key
// embedded.
func writeKubeconfig(path, server, caFile, user, certFile, keyFile string) error {
	ca, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	cert, err := os.ReadFile(certFile)
	if err != nil {
		return err
	}
	key, err := os.ReadFile(keyFile)
	if err != nil {
		return err
	}
	b64 := base64.StdEncoding.EncodeToString
	doc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: parley
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: parley
  context:
    cluster: parley
    user: %s
    namespace: default
current-context: parley
preferences: {}
`, server, b64(ca), user, b64(cert), b64(key), user)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(doc), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
