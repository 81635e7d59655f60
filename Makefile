# The two commands of the README's quick start, and a few helpers. Each sets up what it needs on first use.
#   make run [ARGS="--max-generations 3"]   .venv (runtime only): run zmon on the embedded model, serve /metrics
#   make test [ARGS="-k attach"]            .venv-dev + Prometheus, Alertmanager, Chromium: lint, types, all tests
.PHONY: run test install dev clean

ARGS ?=

run: install
	.venv/bin/zmon run $(ARGS)

test:
	bash scripts/test $(ARGS)

install:
	@bash scripts/setup run
	@echo "zmon is installed in .venv: \`. .venv/bin/activate\` puts \`zmon\` on your PATH (or call .venv/bin/zmon)"

dev:
	bash scripts/setup dev --services

clean:
	rm -rf .venv .venv-dev
