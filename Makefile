# Entry points for the slow device checks that .ci/run leaves out (root; see docs/install.md).
# `make check` is what CI runs; the slow-* targets boot or emulate a Debian root each.

NICE ?= nice -n 10
# extra options for the scripts, e.g. make slow-arm64 ARGS='--keep-deb dist'
ARGS ?=

.PHONY: help check slow-arm64 slow-systemd slow-py313

help:
	@echo 'make check         lint, types and the test suite (.ci/run)'
	@echo 'make slow-arm64    the arm64 .deb and demo story under qemu-user (packaging/deb/test_arm64.sh, ~25 min)'
	@echo 'make slow-systemd  the .deb under systemd as PID 1 (packaging/deb/test_under_systemd.sh, ~25 min cold)'
	@echo 'make slow-py313    the suite on Python 3.13 in a Debian 13 root (packaging/deb/test_python313.sh, ~1 h)'

check:
	bash .ci/run

slow-arm64:
	$(NICE) bash packaging/deb/test_arm64.sh $(ARGS)

slow-systemd:
	$(NICE) bash packaging/deb/test_under_systemd.sh $(ARGS)

slow-py313:
	$(NICE) bash packaging/deb/test_python313.sh $(ARGS)
