"""Tools that drive the service from outside: the simulator, the demo, the benchmark, the
bundled broker and a local worker process. The service itself never imports them."""
