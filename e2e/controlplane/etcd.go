package main

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// startEtcd runs a single-member etcd in this process, listening on free
// loopback ports, and returns its client URL once it serves.
func startEtcd(ctx context.Context, dir, logFile string) (*embed.Etcd, string, error) {
	cfg := embed.NewConfig()
	cfg.Name = "parley"
	cfg.Dir = dir
	local := url.URL{Scheme: "http", Host: "127.0.0.1:0"}
	cfg.ListenClientUrls = []url.URL{local}
	cfg.AdvertiseClientUrls = []url.URL{local}
	cfg.ListenPeerUrls = []url.URL{local}
	cfg.AdvertisePeerUrls = []url.URL{local}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.ListenMetricsUrls = nil
	// The gateway would dial the configured address, port 0, forever.
	cfg.EnableGRPCGateway = false
	cfg.Logger = "zap"
	cfg.LogLevel = "error"
	cfg.LogOutputs = []string{"stderr"} // stderr is the log file unless --log-file=-
	// A throw-away test store: speed over durability.
	cfg.UnsafeNoFsync = true
	cfg.SnapshotCount = 10000
	cfg.AutoCompactionMode = embed.CompactorModePeriodic
	cfg.AutoCompactionRetention = "5m"
	cfg.QuotaBackendBytes = 2 << 30

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, "", err
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, "", err
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, "", errors.New("not ready after 60s")
	case <-ctx.Done():
		e.Close()
		return nil, "", context.Cause(ctx)
	}
	if len(e.Clients) == 0 {
		e.Close()
		return nil, "", errors.New("no client listener")
	}
	return e, fmt.Sprintf("http://%s", e.Clients[0].Addr().String()), nil
}
