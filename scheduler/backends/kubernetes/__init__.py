"""The Kubernetes backend: the executor and its parts (pure object builders, pods, nodes, teams, the lease, caches)."""
