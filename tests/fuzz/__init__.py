"""The fuzz harness: every decoder of outside input (:mod:`.targets`), a
deterministic mutator and an atheris driver (:mod:`.engine`), hostile command
lines for every CLI command (:mod:`.cli`). ``python -m tests.fuzz --help``."""
