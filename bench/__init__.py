"""orch's benchmarks: ``python -m bench`` prints one table against supervisor, circus,
pm2 and GNU parallel and the machine's limits (see docs/performance.md)."""
