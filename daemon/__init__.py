"""The daemon: the engine process, its supervisor, the local bus and the `echoel` command."""
