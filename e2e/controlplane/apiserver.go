package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/spf13/pflag"
	utilerrors "k8s.io/apimachinery/pkg/util/errors"
	"k8s.io/client-go/rest"
	"k8s.io/component-base/cli/globalflag"
	basecompatibility "k8s.io/component-base/compatibility"
	"k8s.io/component-base/featuregate"
	"k8s.io/component-base/logs"
	logsapi "k8s.io/component-base/logs/api/v1"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
	"k8s.io/kubernetes/cmd/kube-apiserver/app/options"
)

// defaultServiceCIDR is the range of Service ClusterIPs unless --service-cidr says otherwise.
const defaultServiceCIDR = "10.0.0.0/24"

// apiServerArgs are the kube-apiserver flags; extra flags given after `--`
// on our command line come last and so win.
func apiServerArgs(c *config, p pkiFiles, etcdURL string, port int) []string {
	if c.nodeIP != "" {
		return append(nodeAPIServerArgs(c, p, etcdURL, port), c.extraAPIServerArg...)
	}
	args := []string{
		"--etcd-servers=" + etcdURL,
		"--advertise-address=127.0.0.1",
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--tls-cert-file=" + p.servingCert,
		"--tls-private-key-file=" + p.servingKey,
		"--client-ca-file=" + p.caCert,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + p.saKey,
		"--service-account-signing-key-file=" + p.saKey,
		"--service-cluster-ip-range=" + c.serviceCIDR,
		"--authorization-mode=RBAC",
		// The ServiceAccount admission plugin wants each namespace's `default`
		// ServiceAccount, which only the (absent) serviceaccount controller makes.
		"--disable-admission-plugins=ServiceAccount",
		"--allow-privileged=true",
		// No kubelet, no nodes: nothing can reach 127.0.0.1 through the
		// `kubernetes` Service, so do not publish endpoints for it.
		"--endpoint-reconciler-type=none",
		"--profiling=false",
		"--v=" + strconv.Itoa(c.verbosity),
	}
	return append(args, c.extraAPIServerArg...)
}

// runAPIServer runs kube-apiserver in this process until ctx ends. It mirrors
// app.NewAPIServerCommand, minus the cobra command and its signal handler,
// and serves on ln.
func runAPIServer(ctx context.Context, c *config, p pkiFiles, etcdURL string, ln net.Listener, port int) error {
	s := options.NewServerRunOptions()
	featureGate := s.GenericServerRunOptions.ComponentGlobalsRegistry.FeatureGateFor(basecompatibility.DefaultKubeComponent)

	fs := pflag.NewFlagSet("kube-apiserver", pflag.ContinueOnError)
	namedFlagSets := s.Flags()
	globalflag.AddGlobalFlags(namedFlagSets.FlagSet("global"), "kube-apiserver", logs.SkipLoggingConfigurationFlags())
	for _, f := range namedFlagSets.FlagSets {
		fs.AddFlagSet(f)
	}
	if err := fs.Parse(apiServerArgs(c, p, etcdURL, port)); err != nil {
		return fmt.Errorf("kube-apiserver flags: %w", err)
	}
	s.SecureServing.Listener = ln
	s.SecureServing.BindPort = port

	if err := s.GenericServerRunOptions.ComponentGlobalsRegistry.Set(); err != nil {
		return err
	}
	// The in-process loopback clients should not log their own warnings.
	rest.SetDefaultWarningHandler(rest.NoWarnings{})
	if err := logsapi.ValidateAndApply(s.Logs, featureGate); err != nil {
		return err
	}
	completed, err := s.Complete(ctx)
	if err != nil {
		return err
	}
	if errs := completed.Validate(); len(errs) != 0 {
		return utilerrors.NewAggregate(errs)
	}
	featureGate.(featuregate.MutableFeatureGate).AddMetrics()
	s.GenericServerRunOptions.ComponentGlobalsRegistry.AddMetrics()
	return app.Run(ctx, completed)
}

// adminHTTPClient talks to the API server as the admin user.
func adminHTTPClient(p pkiFiles) (*http.Client, error) {
	caPEM, err := os.ReadFile(p.caCert)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("bad CA certificate")
	}
	cert, err := tls.LoadX509KeyPair(p.adminCert, p.adminKey)
	if err != nil {
		return nil, err
	}
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}},
		},
	}, nil
}

// waitReady polls /readyz, then waits for the `default` namespace, which the
// API server makes shortly after it is ready.
func waitReady(ctx context.Context, server string, p pkiFiles, apiDone <-chan error, etcdDone <-chan error) error {
	client, err := adminHTTPClient(p)
	if err != nil {
		return err
	}
	defer client.CloseIdleConnections()
	last := "no answer yet"
	for _, path := range []string{"/readyz", "/api/v1/namespaces/default"} {
		for {
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, server+path, nil)
			if err != nil {
				return err
			}
			resp, err := client.Do(req)
			if err == nil {
				body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					break
				}
				last = fmt.Sprintf("%s: %d %s", path, resp.StatusCode, body)
			} else {
				last = err.Error()
			}
			select {
			case err := <-apiDone:
				return fmt.Errorf("API server exited: %v", err)
			case err := <-etcdDone:
				return fmt.Errorf("etcd exited: %v", err)
			case <-ctx.Done():
				return fmt.Errorf("%w (last: %s)", context.Cause(ctx), last)
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return nil
}
