# The test cluster with a real node (`scripts/cluster.sh`, the kubelet build). Included from the Makefile.
