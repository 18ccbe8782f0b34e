"""The machine's facts: memory and pressure, interfaces, RDMA devices, MLX limits, link probes."""
