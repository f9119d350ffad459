"""Small helpers several services need: the settings base class with its run-TOML reader and CLI, the request-body
limit middleware, `$TBRM_HOME` and file digests. Every package may import it; it imports none of them (light:
standard library, pydantic, starlette)."""
