# The benchmarks are run on demand (python -m bench.run_all), never collected by pytest.
collect_ignore_glob = ["*"]
