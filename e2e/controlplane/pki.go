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
}

func pkiPaths(dir string) pkiFiles {
	return pkiFiles{
		dir:         dir,
		caCert:      filepath.Join(dir, "ca.crt"),
		caKey:       filepath.Join(dir, "ca.key"),
		servingCert: filepath.Join(dir, "apiserver.crt"),
		servingKey:  filepath.Join(dir, "apiserver.key"),
		adminCert:   filepath.Join(dir, "admin.crt"),
		adminKey:    filepath.Join(dir, "admin.key"),
		saKey:       filepath.Join(dir, "sa.key"),
	}
}

// ensurePKI creates the certificates and keys once; a restart on the same
// data directory reuses them.
func ensurePKI(dir string) (pkiFiles, error) {
	p := pkiPaths(dir)
	if _, err := os.Stat(p.saKey); err == nil {
		if _, err := tls.LoadX509KeyPair(p.adminCert, p.adminKey); err == nil {
			return p, nil
		}
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

	servingKey, err := newKey()
	if err != nil {
		return p, err
	}
	servingDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1"), net.ParseIP(serviceIP)},
	}, ca, servingKey.Public(), caKey)
	if err != nil {
		return p, err
	}

	adminKey, err := newKey()
	if err != nil {
		return p, err
	}
	adminDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: adminUser, Organization: []string{"system:masters"}},
		NotBefore:    now,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, ca, adminKey.Public(), caKey)
	if err != nil {
		return p, err
	}

	saKey, err := newKey()
	if err != nil {
		return p, err
	}

	for _, w := range []struct {
		path string
		data []byte
	}{
		{p.caCert, pemCert(caDER)},
		{p.caKey, pemKey(caKey)},
		{p.servingCert, pemCert(servingDER)},
		{p.servingKey, pemKey(servingKey)},
		{p.adminCert, pemCert(adminDER)},
		{p.adminKey, pemKey(adminKey)},
		{p.saKey, pemKey(saKey)},
	} {
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

func writeKubeconfig(path, server string, p pkiFiles) error {
	ca, err := os.ReadFile(p.caCert)
	if err != nil {
		return err
	}
	cert, err := os.ReadFile(p.adminCert)
	if err != nil {
		return err
	}
	key, err := os.ReadFile(p.adminKey)
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
`, server, b64(ca), adminUser, b64(cert), b64(key), adminUser)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(doc), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
