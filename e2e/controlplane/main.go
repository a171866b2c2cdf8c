// parley-controlplane: a real kube-apiserver with an embedded etcd, for tests.
//
// It generates a CA, a serving certificate, an admin client certificate (group
// system:masters) and service-account signing keys under DIR/pki, starts etcd
// (in this process) and kube-apiserver (also in this process) on free loopback
// ports, writes DIR/kubeconfig, and prints "ready" on stdout once the API
// server answers /readyz. SIGTERM or SIGINT stops it. See README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

type config struct {
	dataDir           string
	port              int
	logFile           string
	verbosity         int
	exitOnStdinClose  bool
	exitWithParent    bool
	removeDataDir     bool
	gracefulStop      bool
	controllers       bool
	startTimeout      time.Duration
	extraAPIServerArg []string
	// The node of scripts/cluster.sh (node.go); nodeIP == "" without one.
	nodeIP      string
	nodeName    string
	serviceCIDR string
}

func main() {
	os.Exit(run())
}

// errOut is the process's original stderr, kept when fd 2 is redirected to the log file.
var errOut io.Writer = os.Stderr

func logf(format string, args ...any) {
	fmt.Fprintf(errOut, "parley-controlplane: "+format+"\n", args...)
}

func parseFlags() (*config, error) {
	c := &config{}
	fs := flag.NewFlagSet("parley-controlplane", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: parley-controlplane --data-dir DIR [flags] [-- extra kube-apiserver flags]\n\n")
		fs.PrintDefaults()
	}
	fs.StringVar(&c.dataDir, "data-dir", "", "directory for etcd data, certificates, kubeconfig and logs (required)")
	fs.IntVar(&c.port, "port", 0, "secure port of the API server on 127.0.0.1 (0 = a free port)")
	fs.StringVar(&c.logFile, "log-file", "", "where etcd and kube-apiserver log (default DIR/apiserver.log; - = stderr)")
	fs.IntVar(&c.verbosity, "v", 0, "klog verbosity of the API server")
	fs.BoolVar(&c.exitOnStdinClose, "exit-on-stdin-close", false, "shut down when standard input reaches end of file (the parent died)")
	fs.BoolVar(&c.exitWithParent, "exit-with-parent", false, "shut down when the parent process exits")
	fs.BoolVar(&c.removeDataDir, "remove-data-dir", false, "delete the data directory when stopping normally (it is kept after a failure)")
	fs.BoolVar(&c.gracefulStop, "graceful-stop", false, "on SIGTERM, let the API server drain requests (up to 30s) instead of stopping within a quarter of a second")
	fs.BoolVar(&c.controllers, "controllers", true, "run the garbage-collector, namespace, deployment and replicaset controllers")
	fs.DurationVar(&c.startTimeout, "start-timeout", 2*time.Minute, "give up when the API server is not ready by then")
	fs.StringVar(&c.nodeIP, "node-ip", "", "serve a node with this (non-loopback, local) address: listen and advertise on it too, "+
		"publish the `kubernetes` Service's endpoints, enable ServiceAccount admission and the Node authorizer, and write "+
		"certificates and kubeconfigs for the kubelet and kube-proxy (see README.md)")
	fs.StringVar(&c.nodeName, "node-name", "parley-node", "name of the node (with --node-ip)")
	fs.StringVar(&c.serviceCIDR, "service-cidr", defaultServiceCIDR, "range of Service ClusterIPs")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return nil, err
	}
	c.extraAPIServerArg = fs.Args()
	if c.dataDir == "" {
		fs.Usage()
		return nil, errors.New("--data-dir is required")
	}
	if err := checkNodeFlags(c); err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(c.dataDir)
	if err != nil {
		return nil, err
	}
	c.dataDir = abs
	if c.logFile == "" {
		c.logFile = filepath.Join(c.dataDir, "apiserver.log")
	}
	return c, nil
}

func run() int {
	if code, ok := runComponent(); ok {
		return code
	}
	c, err := parseFlags()
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		logf("%v", err)
		return 2
	}
	if err := os.MkdirAll(c.dataDir, 0o700); err != nil {
		logf("%v", err)
		return 1
	}
	if c.logFile != "-" {
		if err := redirectStderr(c.logFile); err != nil {
			logf("redirect logs: %v", err)
			return 1
		}
	}

	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	watchForShutdown(ctx, cancel, c)

	if err := serve(ctx, c); err != nil {
		logf("%v", err)
		if c.logFile != "-" {
			logf("logs: %s", c.logFile)
		}
		return 1 // keep the data directory (and its log) to look at
	}
	if c.removeDataDir {
		if err := os.RemoveAll(c.dataDir); err != nil {
			logf("remove %s: %v", c.dataDir, err)
		}
	}
	return 0
}

// redirectStderr points file descriptor 2 at path, so that everything the
// API server, etcd, gRPC and the Go runtime write lands there; our own
// messages still go to the original stderr.
func redirectStderr(path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	orig, err := unix.Dup(2)
	if err != nil {
		return err
	}
	errOut = os.NewFile(uintptr(orig), "stderr")
	if err := unix.Dup3(int(f.Fd()), 2, 0); err != nil {
		return err
	}
	return f.Close()
}

// watchForShutdown cancels ctx on SIGTERM/SIGINT, on end of stdin or when the
// parent goes away (as asked). A second signal exits at once.
func watchForShutdown(ctx context.Context, cancel context.CancelCauseFunc, c *config) {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	go func() {
		s := <-sigs
		cancel(fmt.Errorf("signal %v", s))
		<-sigs
		logf("second signal, exiting now")
		os.Exit(1)
	}()
	// Nobody waits for us when the parent is gone: exit at once, so that no process
	// outlives a test run even briefly.
	parentGone := func(reason string) {
		logf("stopping: %s", reason)
		if c.removeDataDir {
			_ = os.RemoveAll(c.dataDir)
		}
		os.Exit(0)
	}
	if c.exitOnStdinClose {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			parentGone("standard input closed")
		}()
	}
	if c.exitWithParent {
		parent := os.Getppid()
		go func() {
			t := time.NewTicker(500 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					if os.Getppid() != parent {
						parentGone("parent process exited")
					}
				}
			}
		}()
	}
}

func serve(ctx context.Context, c *config) error {
	pki, err := ensurePKI(filepath.Join(c.dataDir, "pki"), pkiOptionsFor(c))
	if err != nil {
		return fmt.Errorf("certificates: %w", err)
	}

	etcd, etcdURL, err := startEtcd(ctx, filepath.Join(c.dataDir, "etcd"), c.logFile)
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	defer etcd.Close()

	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", c.port))
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	if c.nodeIP != "" {
		// Pods reach the API server through the `kubernetes` Service, whose
		// endpoint is the node's address.
		if ln, err = listenAlsoOn(ln, net.JoinHostPort(c.nodeIP, strconv.Itoa(port))); err != nil {
			return fmt.Errorf("listen: %w", err)
		}
	}
	server := fmt.Sprintf("https://127.0.0.1:%d", port)

	apiCtx, stopAPI := context.WithCancel(context.Background())
	defer stopAPI()
	apiDone := make(chan error, 1)
	go func() {
		apiDone <- runAPIServer(apiCtx, c, pki, etcdURL, ln, port)
	}()

	kubeconfig := filepath.Join(c.dataDir, "kubeconfig")
	if err := writeKubeconfig(kubeconfig, server, pki.caCert, adminUser, pki.adminCert, pki.adminKey); err != nil {
		return err
	}
	if c.nodeIP != "" {
		if err := writeNodeKubeconfigs(c, server, pki); err != nil {
			return err
		}
	}

	readyCtx, readyCancel := context.WithTimeout(ctx, c.startTimeout)
	err = waitReady(readyCtx, server, pki, apiDone, etcd.Err())
	readyCancel()
	if err != nil {
		if cause := context.Cause(ctx); cause != nil {
			return nil // asked to stop while starting
		}
		return fmt.Errorf("API server did not become ready: %w", err)
	}

	var ctrlDone <-chan struct{}
	if c.controllers {
		ctrlDone, err = startControllers(apiCtx, kubeconfig)
		if err != nil {
			return fmt.Errorf("controllers: %w", err)
		}
	}

	fmt.Fprintf(os.Stdout, "ready\n")
	os.Stdout.Sync()
	logf("ready at %s (kubeconfig %s)", server, kubeconfig)

	select {
	case <-ctx.Done():
		logf("stopping: %v", context.Cause(ctx))
	case err := <-apiDone:
		return fmt.Errorf("API server stopped: %v", err)
	case err := <-etcd.Err():
		return fmt.Errorf("etcd stopped: %v", err)
	}

	stopping := time.Now()
	defer func() { logf("stopped in %v", time.Since(stopping).Round(time.Millisecond)) }()
	stopAPI()
	// A test server needs no graceful drain: by default give the API server a moment,
	// then close etcd and exit.
	limit := 250 * time.Millisecond
	if c.gracefulStop {
		limit = 30 * time.Second
	}
	deadline, cancelDeadline := context.WithTimeout(context.Background(), limit)
	defer cancelDeadline()
	if ctrlDone != nil {
		select {
		case <-ctrlDone:
		case <-deadline.Done():
		}
	}
	select {
	case <-apiDone:
	case <-deadline.Done():
	}
	return nil
}
