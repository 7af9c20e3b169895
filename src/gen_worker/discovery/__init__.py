"""Build-time discovery: endpoint.toml, user functions, endpoint.lock."""
