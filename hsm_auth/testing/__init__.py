"""Test helpers that users can reuse in their own CI: emulator fixtures
(:mod:`hsm_auth.testing.softhsm`) and the backend contract suite
(:mod:`hsm_auth.testing.contract`). Nothing here is imported by the library itself."""
