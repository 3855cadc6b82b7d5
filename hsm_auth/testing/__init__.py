"""Test helpers that users can reuse in their own CI: emulator fixtures
(:mod:`hsm_auth.testing.softhsm`, :mod:`hsm_auth.testing.swtpm`), the software
FIDO2 authenticator (:mod:`hsm_auth.testing.soft_fido2`, with fixtures in
:mod:`hsm_auth.testing.fido2`) and the backend contract suite
(:mod:`hsm_auth.testing.contract`). The library imports nothing from here except
where configured to: the fido2 backend opens the software authenticator only for
a method with ``allow_software_authenticator = true``."""
