package main

import (
	"context"
	"os"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

// The node of the test cluster (scripts/cluster.sh) runs the real Kubernetes
// components, built from the same k8s.io/kubernetes module as the API server.
// They are subcommands of this one binary ("hyperkube" style: one link, one
// file), each started as a process of its own:
//
//	parley-controlplane kubelet ...                 (k8s.io/kubernetes/cmd/kubelet)
//	parley-controlplane kube-proxy ...              (k8s.io/kubernetes/cmd/kube-proxy)
//	parley-controlplane kube-scheduler ...          (k8s.io/kubernetes/cmd/kube-scheduler)
//	parley-controlplane kube-controller-manager ... (k8s.io/kubernetes/cmd/kube-controller-manager)
//
// Their flags are exactly the upstream ones.
var components = map[string]func() *cobra.Command{
	// NewKubeletCommand panics on a nil context.
	"kubelet":                 func() *cobra.Command { return kubelet.NewKubeletCommand(context.Background()) },
	"kube-proxy":              proxy.NewProxyCommand,
	"kube-scheduler":          func() *cobra.Command { return scheduler.NewSchedulerCommand() },
	"kube-controller-manager": controllermanager.NewControllerManagerCommand,
}

// runComponent runs os.Args[1] as a Kubernetes component when it names one;
// ok is false otherwise.
func runComponent() (code int, ok bool) {
	if len(os.Args) < 2 {
		return 0, false
	}
	name := os.Args[1]
	if name == "wait-node" {
		return waitNodeMain(os.Args[2:]), true
	}
	if name == "cluster-dns" {
		return clusterDNSMain(os.Args[2:]), true
	}
	if name == "cri-cleanup" {
		return criCleanupMain(os.Args[2:]), true
	}
	newCmd, found := components[name]
	if !found {
		return 0, false
	}
	cmd := newCmd()
	cmd.SetArgs(os.Args[2:])
	return cli.Run(cmd), true
}
