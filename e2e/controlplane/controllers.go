package main

import (
	"context"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/metadata/metadatainformer"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/controller-manager/pkg/informerfactory"
	"k8s.io/kubernetes/pkg/controller/deployment"
	"k8s.io/kubernetes/pkg/controller/garbagecollector"
	namespacecontroller "k8s.io/kubernetes/pkg/controller/namespace"
	"k8s.io/kubernetes/pkg/controller/replicaset"
)

// startControllers runs the few kube-controller-manager controllers that
// tests of an operator notice when absent: the garbage collector (owner
// references), the namespace controller (namespace deletion finishes), and
// the deployment and replicaset controllers (a Deployment gets its
// ReplicaSet and Pods; the Pods stay Pending, there are no nodes). They are
// wired here directly, as kube-controller-manager does, to keep the binary
// small. The returned channel closes when they have stopped.
func startControllers(ctx context.Context, kubeconfig string) (<-chan struct{}, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, err
	}
	cfg.QPS = 200
	cfg.Burst = 400
	cfg.UserAgent = "parley-controlplane-controllers"
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	metadataClient, err := metadata.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}

	trim := func(obj interface{}) (interface{}, error) {
		if a, err := meta.Accessor(obj); err == nil && a.GetManagedFields() != nil {
			a.SetManagedFields(nil)
		}
		return obj, nil
	}
	const resync = 12 * time.Hour
	shared := informers.NewSharedInformerFactoryWithOptions(client, resync, informers.WithTransform(trim))
	metadataInformers := metadatainformer.NewSharedInformerFactoryWithOptions(metadataClient, resync, metadatainformer.WithTransform(trim))
	objectOrMetadata := informerfactory.NewInformerFactory(shared, metadataInformers)

	restMapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(client.Discovery()))
	go wait.Until(restMapper.Reset, 30*time.Second, ctx.Done())

	informersStarted := make(chan struct{})
	var wg sync.WaitGroup
	goRun := func(f func()) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f()
		}()
	}

	// Garbage collector.
	graph := garbagecollector.NewDependencyGraphBuilder(ctx, metadataClient, restMapper,
		garbagecollector.DefaultIgnoredResources(), objectOrMetadata, informersStarted)
	gc, err := garbagecollector.NewComposedGarbageCollector(ctx, client, metadataClient, restMapper, graph)
	if err != nil {
		return nil, err
	}
	// A short sync period: CRDs that a test installs get watched soon.
	const gcSync = 5 * time.Second
	goRun(func() { gc.Run(ctx, 4, 30*time.Second) })
	goRun(func() { gc.Sync(ctx, client.Discovery(), gcSync) })

	// Namespace controller.
	ns := namespacecontroller.NewNamespaceController(ctx, client, metadataClient,
		client.Discovery().ServerPreferredNamespacedResources,
		shared.Core().V1().Namespaces(), 5*time.Minute, v1.FinalizerKubernetes)
	goRun(func() { ns.Run(ctx, 4) })

	// Deployment and ReplicaSet controllers.
	dc, err := deployment.NewDeploymentController(ctx, shared.Apps().V1().Deployments(),
		shared.Apps().V1().ReplicaSets(), shared.Core().V1().Pods(), client)
	if err != nil {
		return nil, err
	}
	goRun(func() { dc.Run(ctx, 2) })
	rsc := replicaset.NewReplicaSetController(ctx, shared.Apps().V1().ReplicaSets(),
		shared.Core().V1().Pods(), client, replicaset.BurstReplicas)
	goRun(func() { rsc.Run(ctx, 2) })

	shared.Start(ctx.Done())
	objectOrMetadata.Start(ctx.Done())
	close(informersStarted)

	done := make(chan struct{})
	go func() {
		wg.Wait()
		shared.Shutdown()
		metadataInformers.Shutdown()
		close(done)
	}()
	return done, nil
}
