"""On-demand performance benchmarks (never collected by pytest). See bench/README.md."""
