# serlens: `make demo` runs the default workflow, `make test` runs the tests.
# Both create .venv on first use (Python 3.11, no root needed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; set TORCH_SPEC="torch==2.13.0 --index-url ..." for another build.
TORCH_SPEC ?= torch==2.13.0
CORES ?= all

.PHONY: install demo real-demo methods-demo protocol-gap test test-real test-fast lint config-readme format bench paper-dry-run report clean

$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -c requirements.lock -e ".[dev,slurm,base]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --cores 1 --report results/report.html
	@echo "results: $(CURDIR)/results (per corpus: results/<corpus>/tables, results/<corpus>/figures)"
	@$(BIN)/python bench/job_seconds.py results | sed -n '/^job-seconds of/,$$p'
	@echo "report: $(CURDIR)/results/report.html"

test: install
	$(BIN)/pytest -q -ra -n 2 --dist loadfile --no-loadscope-reorder

# The real-speech tier alone (EmoDB at $(EMODB); skipped with the reason where it is absent).
test-real: install
	$(BIN)/pytest -q -ra -m real

test-fast: install
	$(BIN)/pytest -q -ra -m "not slow and not slurm"

# The full EmoDB grid (five speaker-group folds) with the bundled Whisper tiny.en and base.
EMODB ?= $(abspath ../shared/data/emodb)
real-demo: install
	$(BIN)/snakemake --cores $(CORES) --configfile config/emodb.yaml \
	  --config 'corpus={root: $(EMODB)}' 'models={tiny.en: bundled:tiny.en, base: bundled:base}'
	@echo "results: $(CURDIR)/results/emodb (tables/, figures/, corpus/fold_summary.tsv)"

# Methods side by side (config/methods.yaml): frozen, LoRA v_proj / all modules / first or
# last half of the layers, DoRA and full fine-tuning at rank 8, on the embedded default.
methods-demo: install
	$(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml config/methods.yaml
	@$(BIN)/python bench/job_seconds.py results/methods | sed -n '/^job-seconds of/,$$p'
	@echo "results: $(CURDIR)/results/methods/synthetic (tables/, figures/)"

protocol-gap: install
	$(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml config/protocol_gap.yaml
	@$(BIN)/python bench/job_seconds.py results/protocol_gap | sed -n '/^job-seconds of/,$$p'
	@echo "results: $(CURDIR)/results/protocol_gap/synthetic/tables/protocol_gap.tsv"

# config/README.md's key table, from the schema (a test fails when it is out of date)
config-readme: install
	$(BIN)/python -c "from serlens.config import write_readme_table; write_readme_table('config/README.md')"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check workflow/
	$(BIN)/snakemake --lint

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/snakefmt workflow/

bench: install
	$(BIN)/python bench/bench_ab_memory.py
	$(BIN)/python bench/bench_training.py
	$(BIN)/python bench/bench_causal.py --tiny-en resources/weights/tiny.en
	$(BIN)/python bench/job_seconds.py results

# The paper's grid against a small IEMOCAP-format tree the tests write: prints the job counts.
paper-dry-run: install
	rm -rf /tmp/serlens-paper-tree && $(BIN)/python tests/iemocap_tree.py /tmp/serlens-paper-tree/IEMOCAP_full_release
	printf 'corpus:\n  root: /tmp/serlens-paper-tree/IEMOCAP_full_release\n' > /tmp/serlens-paper-tree/root.yaml
	$(BIN)/snakemake -n --quiet rules --configfile config/paper.yaml /tmp/serlens-paper-tree/root.yaml

clean:
	rm -rf results .snakemake
