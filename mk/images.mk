# Container images (`make images`). Owned by the images work; included from the Makefile.
# The logic is in scripts/images.sh (and scripts/docker.sh, which installs Debian's
# docker.io and starts dockerd when needed); docs/images.md describes the images.
#
#   make images           ghcr.io/parley-dev/parley-gateway:<appVersion> and
#                         ghcr.io/parley-dev/parley-operator:<appVersion> (the chart's
#                         defaults), from static release binaries
#   make test-images      the test-only images: ghcr.io/parley-dev/parley-mock-llm:<appVersion>
#                         and parley-test/redis:<Debian version> (also :local)
#   make test-images-e2e  the image tests (e2e/images) on the images these two built
#   scripts/images.sh save DIR   one `docker save` tar per image, for `ctr images import`

.PHONY: images test-images test-images-e2e

images: toolchain ## Build the gateway and operator images (static binaries, local dockerd)
	@scripts/images.sh build gateway operator

test-images: toolchain ## Build the test-only images: parley-mock-llm and Redis
	@scripts/images.sh build mock-llm redis

# The operator image is tested against the test API server, hence the control plane.
test-images-e2e: images test-images $(VENV)/.installed $(CONTROLPLANE_BIN) ## Test the images (read-only, non-root)
	$(PYTHON) -m pytest -q -c e2e/images/pytest.ini e2e/images
