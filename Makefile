# Set-up and checks. Every target creates/refreshes the virtual environment it needs.
# On this project's machines torch/torchvision are pinned (requirements-pinned.txt); elsewhere `pip install .`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup chromium demo predict-sample test test-fast readme-examples check lint typecheck pytest bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-pinned.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c requirements-pinned.txt -r requirements-pinned.txt
	$(PY) -m pip install -q --disable-pip-version-check -c requirements-pinned.txt -e ".[dev,export,serve,deploy,ray,formats,loggers,tracking,sahi]"
	# tidecv (the TIDE reference, tests/test_analysis.py only), trackers and sahi declare the non-headless
	# opencv-python, which would clobber cv2: installed without their dependencies; the ones they need to
	# import are the extras above (trackers, sahi) and the line after (tidecv).
	$(PY) -m pip install -q --disable-pip-version-check --no-deps tidecv==1.0.1 appdirs==1.4.4 trackers==2.6.1 sahi==0.12.8
	$(PY) -m pip install -q --disable-pip-version-check -c requirements-pinned.txt pandas seaborn
	touch $@

# Headless Chromium for tests/test_serve_browser.py: Debian's package, installed only when missing and
# apt-get is usable (root); never a browser download. Without it that test skips, saying why.
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
			|| echo "warning: could not install chromium; the browser test will be skipped"; \
	else echo "note: chromium missing and apt-get unavailable (or not root); the browser test will be skipped"; fi

# The main job (see README and docs/demo.md): synthetic data, train a CPU-sized ATSS from scratch,
# COCO mAP on the val split, drawn detections, loss/mAP plot, checkpoint -> runs/demo/.
# Re-running reuses the data and the trained model; DEMO_ARGS=--retrain trains again.
demo: setup
	$(PY) -m atssdet demo --out runs/demo $(DEMO_ARGS)

# Detections of the converted MegEngine res18 reference checkpoint on the sample image.
predict-sample: setup
	$(PY) -m atssdet predict ../shared/reference/megengine/cat.jpg \
		--model atss_res18_coco_3x_800size \
		--weights ../shared/reference/megengine/atss_res18_coco_3x_800size.seed0.pkl.gz \
		--out runs/predict-sample

# The whole test suite: lint, type-check, tests.
test: setup chromium check

check: lint typecheck pytest

# Unit tests only (no training runs, subprocesses, exports or whole-model parity): under 2 minutes.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check atssdet tests benchmarks tools hubconf.py

typecheck:
	$(PY) -m mypy

pytest:
	$(PY) -m pytest -q -n auto --dist loadfile

# The README's example block, run twice in a row in a fresh clone (tools/readme_examples.py).
readme-examples: setup
	$(PY) tools/readme_examples.py --runs 2

bench: setup
	$(PY) benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache runs
