"""The model repository: sources, config parsing, version policy and the load manager."""
