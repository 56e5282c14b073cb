"""Notebook sandboxes: the JupyterHub spawner, the hub integration and idle-GPU culling."""
