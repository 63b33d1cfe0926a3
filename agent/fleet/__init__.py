"""Operator side: keys, the TUF repository, the rollout controller and the reference server."""
