package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// waitNodeMain is `parley-controlplane wait-node`: it waits until the node
// reports Ready and the `default` ServiceAccount of the `default` namespace
// exists (so kube-controller-manager works), for scripts/cluster.sh.
func waitNodeMain(args []string) int {
	fs := flag.NewFlagSet("wait-node", flag.ContinueOnError)
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig of the cluster (required)")
	node := fs.String("node", "parley-node", "name of the node")
	timeout := fs.Duration("timeout", 3*time.Minute, "give up after this long")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *kubeconfig == "" {
		fmt.Fprintln(os.Stderr, "wait-node: --kubeconfig is required")
		return 2
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fmt.Fprintf(os.Stderr, "wait-node: %v\n", err)
		return 1
	}
	cfg.Timeout = 5 * time.Second
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "wait-node: %v\n", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	last := "no answer yet"
	for {
		n, err := client.CoreV1().Nodes().Get(ctx, *node, metav1.GetOptions{})
		switch {
		case err != nil:
			last = err.Error()
		case !nodeReady(n):
			last = "node " + *node + " is not Ready: " + nodeConditions(n)
		default:
			_, err := client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
			if err == nil {
				return 0
			}
			last = "ServiceAccount default/default: " + err.Error()
		}
		select {
		case <-ctx.Done():
			fmt.Fprintf(os.Stderr, "wait-node: not ready after %v: %s\n", *timeout, last)
			return 1
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func nodeReady(n *v1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == v1.NodeReady {
			return c.Status == v1.ConditionTrue
		}
	}
	return false
}

func nodeConditions(n *v1.Node) string {
	var parts []string
	for _, c := range n.Status.Conditions {
		parts = append(parts, fmt.Sprintf("%s=%s (%s: %s)", c.Type, c.Status, c.Reason, c.Message))
	}
	if len(parts) == 0 {
		return "no conditions yet"
	}
	return strings.Join(parts, "; ")
}

// criCleanupMain is `parley-controlplane cri-cleanup --endpoint unix:///...`:
// it stops and removes every pod sandbox and container of a CRI runtime, as
// the kubelet would. Stopping a sandbox through CRI tears down its network
// (CNI DEL) and unmounts its network namespace, which killing the processes
// would leave behind. scripts/cluster.sh runs it on `down`, after the kubelet
// has stopped.
func criCleanupMain(args []string) int {
	fs := flag.NewFlagSet("cri-cleanup", flag.ContinueOnError)
	endpoint := fs.String("endpoint", "", "CRI socket, unix:///path (required)")
	timeout := fs.Duration("timeout", 60*time.Second, "give up after this long")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *endpoint == "" {
		fmt.Fprintln(os.Stderr, "cri-cleanup: --endpoint is required")
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	conn, err := grpc.NewClient(*endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintf(os.Stderr, "cri-cleanup: %v\n", err)
		return 1
	}
	defer conn.Close()
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	failed := false
	sandboxes, err := rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
	if err != nil {
		fmt.Fprintf(os.Stderr, "cri-cleanup: list pod sandboxes: %v\n", err)
		return 1
	}
	for _, s := range sandboxes.Items {
		name := s.Id
		if s.Metadata != nil {
			name = s.Metadata.Namespace + "/" + s.Metadata.Name
		}
		if _, err := rt.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: s.Id}); err != nil {
			fmt.Fprintf(os.Stderr, "cri-cleanup: stop pod %s: %v\n", name, err)
			failed = true
		}
		if _, err := rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: s.Id}); err != nil {
			fmt.Fprintf(os.Stderr, "cri-cleanup: remove pod %s: %v\n", name, err)
			failed = true
		}
	}
	// Containers whose sandbox is already gone.
	containers, err := rt.ListContainers(ctx, &runtimeapi.ListContainersRequest{})
	if err != nil {
		fmt.Fprintf(os.Stderr, "cri-cleanup: list containers: %v\n", err)
		return 1
	}
	for _, c := range containers.Containers {
		_, _ = rt.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: c.Id, Timeout: 0})
		if _, err := rt.RemoveContainer(ctx, &runtimeapi.RemoveContainerRequest{ContainerId: c.Id}); err != nil {
			fmt.Fprintf(os.Stderr, "cri-cleanup: remove container %s: %v\n", c.Id, err)
			failed = true
		}
	}
	fmt.Fprintf(os.Stderr, "cri-cleanup: removed %d pod sandboxes, %d other containers\n", len(sandboxes.Items), len(containers.Containers))
	if failed {
		return 1
	}
	return 0
}
