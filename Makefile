# Shortcuts for developers; the README's commands are the reference.
.PHONY: install dev test test-api ci run clean

install:
	bash scripts/install.sh

dev:
	.venv/bin/pip install -e '.[test]' --config-settings editable_mode=compat

test:
	bash scripts/test.sh

test-api:
	.venv/bin/python -m pytest -q tests/api

ci:
	bash .ci/run

# a daemon in the foreground on a private socket and root, for trying things out
run:
	mkdir -p /tmp/hd-dev
	.venv/bin/twistd -n --pidfile= hyperd --socket /tmp/hd-dev/h.sock --root /tmp/hd-dev/root \
		--run-dir /tmp/hd-dev/run

clean:
	rm -rf build dist *.egg-info twisted/plugins/dropin.cache
